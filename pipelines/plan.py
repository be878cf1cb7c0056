"""Build and run the curation plan (issue "Ray Data curation"): sources → decode → rules → caption → scores → dedup →
bucket → encode → write, one Ray Data pipeline per modality, each stage's resources from the config.

Consecutive stages of one kind with the same resources form one operator, a ``stage.StageChain``: model-free stages
run in Ray tasks (an image is decoded, filtered, bucketed and serialised in one process, its row converted to and from
the batch format once), model stages in actor pools (models loaded once per actor; e.g. VAE and text encoder share one).
The run's records (its ledger and its dedup index, one actor) and the shard writers are named actors of this run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from models.config_io import ConfigError, to_dict
from pipelines import constants as C
from pipelines.buckets import Bucketize, bucket_table
from pipelines.config import PrepareConfig, Resources, mel_config
from pipelines.decode import Decode
from pipelines.encode import (
    AudioVaeEncode,
    TensorEncode,
    TextEncode,
    VaeEncode,
    audio_vae_record,
    encoder_records,
    run_encoders,
    run_mel,
)
from pipelines.filters import Dedup, DedupIndex, RuleFilter
from pipelines.io import options_for, resolve_storage
from pipelines.labels import assign_labels, check_labels, label_source, labels_record
from pipelines.ledger import Ledger, ledger_name, new_run_id
from pipelines.manifest import OutputState
from pipelines.shards import encoder_json, read_labels, shard_encoders
from pipelines.sources import expand_tar, items_table, list_inputs
from pipelines.stage import StageChain, run_task_chain
from pipelines.writer import ShardWriter, WriteShards, writer_name

log = logging.getLogger(__name__)

STAGE_ORDER = [C.STAGE_READ, C.STAGE_DECODE, C.STAGE_FILTER, C.STAGE_CAPTION, C.STAGE_SCORE, C.STAGE_DEDUP,
               C.STAGE_BUCKET, C.STAGE_ENCODE, "text_encode", C.STAGE_WRITE]


@dataclass
class StageSpec:
    """One stage of the plan: its class, its constructor arguments (the run's ledger is added when it runs) and its
    resources."""

    cls: type
    kwargs: dict[str, Any]
    resources: Resources
    actor: bool  # model stages: an actor pool; the rest: tasks


@dataclass
class PreparePlan:
    """What a prepare run will do: the stages of each modality (``--dry-run`` prints ``describe()``)."""

    config: PrepareConfig
    run_id: str
    stages: dict[str, list[StageSpec]] = field(default_factory=dict)
    mel: dict[str, Any] = field(default_factory=dict)  # the audio stages' log-mel parameters (run_mel), as a dict

    def describe(self) -> str:
        lines = [f"run {self.run_id}: {', '.join(self.config.inputs)} → {self.config.output}"]
        for modality, specs in self.stages.items():
            lines.append(f"  {modality}:")
            lines.extend(f"    {i + 1}. {describe(group)}" for i, group in enumerate(operators(specs)))
        if self.config.read.label_from != "none":
            lines.append(f"  labels: {label_source(self.config.read.label_from, self.config.read.label_column)}")
        table = bucket_table(self.config, mel_config(self.mel))
        for modality in self.stages:
            buckets = [b for b in table if b.modality == modality]
            shown = ", ".join(f"{b.name}(mb {b.micro_batch})" for b in buckets[:6])
            lines.append(f"  {modality} buckets ({len(buckets)}): {shown}{' …' if len(buckets) > 6 else ''}")
        return "\n".join(lines)


def build_plan(config: PrepareConfig, s3_options: dict, run_id: str | None = None,
               encoders: dict[str, dict | None] | None = None) -> PreparePlan:
    """The stages of each modality, from the config alone (no model is loaded). ``encoders``: the run's records
    (``encoder_records``), which the encode stages check the models they load against, and whose mel-VAE record gives
    the audio stages their log-mel parameters (``run_mel``); without them (``--dry-run``) only the mel VAE's
    config.json is read, for those parameters — a folder that is no mel VAE is a ConfigError here too."""
    if encoders is None:
        audio = C.AUDIO in config.read.modalities
        encoders = {C.AUDIO_VAE: audio_vae_record(config.encode, s3_options) if audio else None}
    run_id = run_id or new_run_id()
    cfg = to_dict(config)  # stages rebuild the dataclass inside the worker (docs/architecture.md#design-rules)
    mel = to_dict(run_mel(encoders))
    plan = PreparePlan(config, run_id, mel=mel)
    dec_res = config.decode.resources
    for modality in config.read.modalities:
        # the audio stages' sample rate, frame counts, features: the mel VAE's parameters (docs/curation.md#encodings)
        audio = {"mel": mel} if modality == C.AUDIO else {}
        specs = [StageSpec(Decode, {"config": cfg, "modality": modality, "s3_options": s3_options, **audio}, dec_res,
                           False)]
        f = config.filter
        if f.enabled:
            specs.append(StageSpec(RuleFilter, {"config": cfg, **audio}, dec_res, False))
        caption_model = config.caption.audio_model if modality == C.AUDIO else config.caption.model
        # the model stages' modules import torch: only a plan that has them pays for it (a driver and task workers
        # without model stages never import it; docs/benchmarks.md#curation)
        if config.caption.enabled and caption_model:
            from pipelines.caption import Captioner

            specs.append(StageSpec(Captioner, {"config": cfg, "modality": modality, **audio},
                                   config.caption.resources, True))
        score_model = {C.IMAGE: f.clip_model, C.AUDIO: f.clap_model}.get(modality)
        if f.enabled and score_model:
            from pipelines.scores import ScoreFilter

            specs.append(StageSpec(ScoreFilter, {"config": cfg, "modality": modality, **audio}, f.resources, True))
        if f.enabled and (f.dedup_exact or f.dedup_perceptual):
            specs.append(StageSpec(Dedup, {"config": cfg, "index": ledger_name(run_id)}, dec_res, False))
        specs.append(StageSpec(Bucketize, {"config": cfg, **audio}, dec_res, False))
        e = config.encode
        if modality == C.IMAGE and e.enabled and e.vae:
            specs.append(StageSpec(VaeEncode, {"config": cfg, "record": encoders.get(C.MANIFEST_VAE)},
                                   e.vae_resources, True))
        elif modality == C.AUDIO and e.enabled and e.audio_vae:
            specs.append(StageSpec(AudioVaeEncode, {"config": cfg, "record": encoders.get(C.AUDIO_VAE)},
                                   e.audio_vae_resources, True))
        else:
            specs.append(StageSpec(TensorEncode, dict(audio), dec_res, False))
        if e.enabled and e.text_encoder:
            text = {"config": cfg, "output_options": options_for(config.output, s3_options),
                    "record": encoders.get(C.MANIFEST_TEXT_ENCODER)}
            specs.append(StageSpec(TextEncode, text, e.text_resources, True))
        specs.append(StageSpec(WriteShards, {"config": cfg, "run_id": run_id}, config.write.resources, False))
        plan.stages[modality] = specs
    return plan


def describe(group: list[StageSpec]) -> str:
    """One operator: its stages, how it runs and what it asks Ray for."""
    r = group[0].resources
    low, high = pool_size(r)
    kind = (f"actors×{low}" if low == high else f"actors×{low}..{high}") if group[0].actor else "tasks"
    extra = f", gpus={r.num_gpus}" if r.num_gpus else ""
    extra += f", accelerator={r.accelerator_type}" if r.accelerator_type else ""
    extra += "".join(f", {name}={amount:g}" for name, amount in sorted(r.custom.items()))
    stages = " → ".join(spec.cls.__name__ for spec in group)
    return f"{stages}: {kind}, cpus={r.num_cpus}{extra}, batch={r.batch_size}"


def operators(specs: list[StageSpec]) -> list[list[StageSpec]]:
    """Group consecutive stages of one kind (tasks or actors) with the same resources into one Ray Data operator
    (``StageChain``): model-free stages share a task, model stages share an actor — e.g. the VAE and the text encoder
    on one GPU — which saves a worker process and a hand-over of every batch per stage."""
    groups: list[list[StageSpec]] = []
    for spec in specs:
        last = groups[-1] if groups else None
        if last and last[-1].actor == spec.actor and last[-1].resources == spec.resources:
            last.append(spec)
        else:
            groups.append([spec])
    return groups


# ---- running ----------------------------------------------------------------------------------------------------------
def remote_args(r: Resources) -> dict[str, Any]:
    """The Ray resource request of one operator (``map_batches`` keyword arguments)."""
    args: dict[str, Any] = {"num_cpus": r.num_cpus}
    if r.num_gpus:
        args["num_gpus"] = r.num_gpus
    if r.accelerator_type:
        args["accelerator_type"] = r.accelerator_type
    if r.custom:
        args["resources"] = dict(r.custom)  # Ray custom resources, e.g. {"encode_gpu": 1}: the autoscaler reads them
    return args


def pool_size(r: Resources) -> tuple[int, int]:
    """The smallest and largest actor pool of a model stage: a fixed ``concurrency`` (at least 1), or from there up to
    ``max_concurrency`` (docs/curation.md#stages-pipelines-in-pipeline-order)."""
    low = max(1, r.concurrency)
    return low, max(low, r.max_concurrency)


def task_batch_size(r: Resources, rows: int, cpus: float) -> int:
    """A task stage's rows per task: its ``batch_size``, smaller when the job is too small to give every CPU of the
    cluster a task at that size (Ray Data gathers blocks up to the batch size, so this sets how many tasks run)."""
    return max(1, min(r.batch_size, math.ceil(rows / max(1, int(cpus // max(r.num_cpus, 1e-3))))))


def apply_operator(ds, group: list[StageSpec], run_id: str, modality: str, rows: int, cpus: float):
    import ray

    r = group[0].resources
    ledger = ledger_name(run_id)
    stages = [(spec.cls, spec.kwargs) for spec in group]
    if group[0].actor:
        low, high = pool_size(r)
        # a growing pool: Ray Data's actor autoscaler adds actors while the batches in flight per actor pass its
        # utilisation threshold, and the cluster autoscaler adds the nodes their resource requests wait for
        pool = (ray.data.ActorPoolStrategy(size=low) if low == high
                else ray.data.ActorPoolStrategy(min_size=low, max_size=high))
        return ds.map_batches(StageChain, fn_constructor_kwargs={"stages": stages, "ledger": ledger},
                              batch_size=r.batch_size, batch_format="numpy", compute=pool, **remote_args(r))
    args = remote_args(r)
    if r.concurrency:
        args["compute"] = ray.data.TaskPoolStrategy(size=r.concurrency)
    names = "-".join(spec.cls.__name__ for spec in group)
    return ds.map_batches(run_task_chain, fn_kwargs={"stages": stages, "ledger": ledger,
                                                     "cache_key": f"{run_id}-{modality}-{names}"},
                          batch_size=task_batch_size(r, rows, cpus), batch_format="numpy", **args)


class RunRecords(Ledger, DedupIndex):
    """The run's records, one named actor: its ledger (what every stage read, kept and rejected) and its dedup index
    (every content hash it accepted). Both are a few dicts that each batch consults once; one process for the two
    saves every job a Ray worker's start, about 0.5 CPU-s (docs/benchmarks.md#curation)."""

    def __init__(self, output: str, storage: dict, run_id: str, flush_rows: int, max_distance: int):
        Ledger.__init__(self, output, storage, run_id, flush_rows)
        DedupIndex.__init__(self, max_distance)


def run_prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the job to completion; returns the stats written to OUTPUT/stats.json. Ray must be initialised."""
    import ray

    config.validate()
    wall_start = time.time()
    s3_options = resolve_storage("s3://", config.storage)
    out_options = options_for(config.output, s3_options)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = config.progress
    # no thread per task polling its memory for Ray Data's stats (read by nothing here; docs/benchmarks.md#curation)
    context.memory_usage_poll_interval_s = None

    state = OutputState(config.output, out_options).load()
    encoders = encoder_records(config, s3_options)  # config.json of each model only
    check_encoders(state, config, encoders)  # before anything is written: one output, one set of encoders
    existing_labels = read_labels(config.output, out_options)
    check_labels(config.read, existing_labels, bool(state.sidecars or state.rejects.num_rows), config.output)
    state.remove_uncommitted()
    done = state.done_keys()

    # -- read: list the inputs (tars expanded in parallel Ray tasks) and skip what earlier runs finished --------------
    items, tars = list_inputs(config.inputs, s3_options)
    if tars:
        expand = ray.remote(num_cpus=0.5)(expand_tar)
        for part in ray.get([expand.remote(t, options_for(t, s3_options)) for t in tars]):
            items.extend(part)
    listed = len(items)
    unique: dict[str, dict] = {}
    for item in items:
        unique.setdefault(item[C.KEY], item)  # the same file named by two inputs is one sample
    class_names = None
    if config.read.label_from != "none":  # indices fixed from every listed item before a worker starts
        class_names = assign_labels(list(unique.values()), config.read, existing_labels)
        state.write_json(C.LABELS_FILE, labels_record(config.read, class_names))
        log.info("%d class labels from %s", len(class_names),
                 label_source(config.read.label_from, config.read.label_column))
    items = [it for k, it in unique.items() if k not in done]
    skipped = len(unique) - len(items)
    if config.read.limit:
        items = items[: config.read.limit]
    log.info("listed %d inputs (%d tars); %d already done; %d to process", listed, len(tars), skipped, len(items))

    cpus = ray.cluster_resources().get("CPU", 1.0)
    config = replace(config, write=replace(config.write, num_writers=config.write.writers(cpus)))
    plan = build_plan(config, s3_options, encoders=encoders)
    run_id = plan.run_id
    records = ray.remote(num_cpus=0)(RunRecords).options(name=ledger_name(run_id)).remote(
        config.output, out_options, run_id, config.write.rejects_flush_rows, config.filter.phash_max_distance)
    ray.get(records.seed.remote(state.hash_records()))
    writers = [
        ray.remote(num_cpus=0)(ShardWriter).options(name=writer_name(run_id, i)).remote(
            config.output, out_options, run_id, config.write.samples_per_shard, state.next_indices(), encoders)
        for i in range(config.write.num_writers)
    ]
    ray.get(records.add.remote(C.STAGE_READ, **{"in": listed, "out": len(items), "skipped_done": skipped,
                                                 "duplicate_inputs": listed - len(unique)}))
    log.info("plan:\n%s", plan.describe())

    run_start = time.time()
    try:
        for modality, specs in plan.stages.items():
            rows = [it for it in items if it[C.MODALITY] == modality]
            if not rows:
                continue
            cpus = ray.cluster_resources().get("CPU", 1.0)
            blocks = math.ceil(len(rows) / task_batch_size(config.decode.resources, len(rows), cpus))
            ds = ray.data.from_arrow(items_table(rows), override_num_blocks=min(blocks, 10_000))
            for group in operators(specs):
                ds = apply_operator(ds, group, run_id, modality, len(rows), cpus)
            for _ in ds.iter_batches(batch_size=None):
                pass
        totals = ray.get([w.flush.remote() for w in writers])
        ray.get(records.flush.remote())
        snapshot = ray.get(records.snapshot.remote())
    finally:
        for handle in [records, *writers]:
            ray.kill(handle)
    elapsed = time.time() - run_start

    state = OutputState(config.output, out_options).load()
    manifest, rejects = state.write_tables()
    stats = make_stats(run_id, snapshot, totals, manifest, rejects, elapsed, time.time() - wall_start, encoders)
    if class_names is not None:
        stats["labels"] = {"from": label_source(config.read.label_from, config.read.label_column),
                           "classes": len(class_names)}
    state.write_json(C.STATS_FILE, stats)
    return stats


def check_encoders(state: OutputState, config: PrepareConfig, encoders: dict[str, dict | None]) -> None:
    """Refuse (ConfigError) to add shards to an output whose committed shards of a modality this run reads were written
    with other encoders than this run's (``encoders``, from ``encoder_records``): another VAE, scale, shift or latent
    channels (of the image VAE or of the mel VAE, whose record also has its mel parameters); latents next to images
    stored as images, or next to audio stored as log-mel; another text encoder or text setting; text features next to
    shards without; shards without records (an older jobs.prepare) next to ones with. Resuming never mixes encoders."""
    rows = state.manifest_table().to_pylist()
    for modality in config.read.modalities:
        existing_rows = [r for r in rows if r["modality"] == modality]
        if not existing_rows:
            continue
        try:
            existing = shard_encoders(existing_rows)
        except ValueError as exc:
            raise ConfigError(f"{config.output}: its {modality} shards already mix encoders: {exc}") from exc
        wanted = run_encoders(modality, encoders)
        fix = "rerun with the encode settings of the existing shards, or write to a new --output"
        if modality in (C.IMAGE, C.AUDIO):
            members = sorted({str(r["member"]) for r in existing_rows})
            latents = wanted[C.MANIFEST_VAE] is not None
            key, stored = ("encode.vae", "images") if modality == C.IMAGE else ("encode.audio_vae", "log-mel")
            if latents and members != [C.LATENT_MEMBER]:
                raise ConfigError(f"{config.output} holds {modality} shards stored as {members}, but this run would "
                                  f"add VAE latents ({encoder_json(wanted[C.MANIFEST_VAE])}); {fix}")
            if not latents and C.LATENT_MEMBER in members:
                raise ConfigError(f"{config.output} holds {modality} shards of VAE latents "
                                  f"({_described(C.MANIFEST_VAE, existing[C.MANIFEST_VAE])}), but this run would store "
                                  f"{stored} (no {key}, or encode.enabled=false); {fix}")
        for column in C.ENCODER_COLUMNS:
            have, want = existing[column], wanted[column]
            if have != want:
                theirs, ours = _described(column, have), _described(column, want, existing=False, modality=modality)
                raise ConfigError(f"{config.output} holds {modality} shards written with {column} {theirs}, but this "
                                  f"run's is {ours}; {fix}")


def _described(column: str, record: dict | None, existing: bool = True, modality: str = C.IMAGE) -> str:
    if record is not None:
        return encoder_json(record)
    if not existing:
        key = C.AUDIO_VAE if column == C.MANIFEST_VAE and modality == C.AUDIO else column
        return f"none (no encode.{key}, or encode.enabled=false)"
    if column == C.MANIFEST_VAE:
        return "none (no VAE latents, or latents written by an older jobs.prepare without a record)"
    return "none (no precomputed text features, or features written by an older jobs.prepare without a record)"


def make_stats(run_id, snapshot, totals, manifest, rejects, elapsed, wall, encoders=None) -> dict[str, Any]:
    stages = {}
    for name in STAGE_ORDER:
        c = snapshot["counts"].get(name)
        if not c:
            continue
        seconds = c.get("seconds", 0.0)
        stages[name] = {
            "in": int(c.get("in", 0)), "out": int(c.get("out", 0)),
            "rejected": dict(sorted(snapshot["reasons"].get(name, {}).items())),
            "seconds": round(seconds, 3),
            "rows_per_s": round(c.get("in", 0) / seconds, 1) if seconds > 0 else None,
            # processes: how many started the stage (Ledger.started): a model stage's actors, a task stage's workers
            **{k: int(v) for k, v in c.items() if k in ("skipped_done", "duplicate_inputs", "processes")},
        }
    by_reason: dict[str, dict[str, int]] = {}
    for stage, reason in zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist()):
        by_reason.setdefault(stage, {}).setdefault(reason, 0)
        by_reason[stage][reason] += 1
    written = sum(t["samples"] for t in totals)
    encoders = encoders or {}
    return {
        "run_id": run_id,
        C.STATS_ENCODERS: {name: encoders.get(name) for name in C.RUN_ENCODERS},
        "run": {"stages": stages, "written_samples": written, "written_shards": sum(t["shards"] for t in totals),
                "writers": len(totals),
                "seconds": round(elapsed, 3), "wall_seconds": round(wall, 3),
                "samples_per_s": round(written / elapsed, 2) if elapsed > 0 else None},
        "total": {"shards": manifest.num_rows, "samples": int(sum(manifest.column("samples").to_pylist())),
                  "rejected": rejects.num_rows, "rejected_by_stage": by_reason},
    }


def summary_table(stats: dict[str, Any]) -> str:
    """The closing table: read / rejected by reason / written / throughput per stage."""
    run = stats["run"]
    lines = [f"{'stage':<12} {'in':>8} {'out':>8} {'rejected':>9} {'rows/s':>9}  reasons",
             "-" * 72]
    for name, s in run["stages"].items():
        rejected = sum(s["rejected"].values())
        reasons = ", ".join(f"{k}={v}" for k, v in s["rejected"].items())
        if name == C.STAGE_READ:
            reasons = f"already done={s.get('skipped_done', 0)}"
        rate = f"{s['rows_per_s']:.1f}" if s.get("rows_per_s") else "-"
        lines.append(f"{name:<12} {s['in']:>8} {s['out']:>8} {rejected:>9} {rate:>9}  {reasons}")
    lines.append("-" * 72)
    total = stats["total"]
    lines.append(f"written this run: {run['written_samples']} samples in {run['written_shards']} shards, "
                 f"{run['seconds']:.1f}s ({run['samples_per_s']} samples/s); "
                 f"output now: {total['samples']} samples, {total['shards']} shards, {total['rejected']} rejects")
    for name, record in stats.get(C.STATS_ENCODERS, {}).items():
        if record is not None:
            lines.append(f"{name}: {encoder_json(record)}")
    if stats.get("labels"):
        lines.append(f"labels: {stats['labels']['classes']} classes from {stats['labels']['from']} "
                     f"({C.LABELS_FILE})")
    return "\n".join(lines)
