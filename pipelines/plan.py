"""Build and run the curation plan (issue "Ray Data curation"): sources → decode → rules → caption → scores → dedup →
bucket → encode → write, one Ray Data pipeline per modality, each stage's resources from the config.

Model-free stages run as Ray tasks (Ray fuses consecutive ones into one operator, so an image is decoded, filtered,
bucketed and serialised in one process); model stages run as actor pools (model loaded once per actor). The ledger,
the dedup index and the shard writers are named actors of this run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any


from models.config_io import to_dict
from pipelines import constants as C
from pipelines.buckets import Bucketize, bucket_table
from pipelines.caption import Captioner
from pipelines.config import PrepareConfig, Resources
from pipelines.decode import Decode
from pipelines.encode import TensorEncode, TextEncode, VaeEncode
from pipelines.filters import Dedup, DedupIndex, RuleFilter, dedup_name
from pipelines.scores import ScoreFilter
from pipelines.io import options_for, resolve_storage
from pipelines.ledger import Ledger, ledger_name, new_run_id, run_task_stage
from pipelines.manifest import OutputState
from pipelines.sources import expand_tar, items_table, list_inputs
from pipelines.writer import ShardWriter, WriteShards, writer_name

log = logging.getLogger(__name__)

STAGE_ORDER = [C.STAGE_READ, C.STAGE_DECODE, C.STAGE_FILTER, C.STAGE_CAPTION, C.STAGE_SCORE, C.STAGE_DEDUP,
               C.STAGE_BUCKET, C.STAGE_ENCODE, "text_encode", C.STAGE_WRITE]


@dataclass
class StageSpec:
    """One operator of the plan: the stage class, its constructor arguments and its resources."""

    cls: type
    kwargs: dict[str, Any]
    resources: Resources
    actor: bool  # model stages: an actor pool; the rest: tasks

    def describe(self) -> str:
        r = self.resources
        kind = f"actors×{max(1, r.concurrency)}" if self.actor else "tasks"
        extra = f", gpus={r.num_gpus}" if r.num_gpus else ""
        extra += f", accelerator={r.accelerator_type}" if r.accelerator_type else ""
        return f"{self.cls.__name__:<13} {kind:<9} cpus={r.num_cpus}{extra}, batch={r.batch_size}"


@dataclass
class Plan:
    config: PrepareConfig
    run_id: str
    stages: dict[str, list[StageSpec]] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"run {self.run_id}: {', '.join(self.config.inputs)} → {self.config.output}"]
        for modality, specs in self.stages.items():
            lines.append(f"  {modality}:")
            lines.extend(f"    {i + 1}. {s.describe()}" for i, s in enumerate(specs))
        table = bucket_table(self.config)
        for modality in self.stages:
            buckets = [b for b in table if b.modality == modality]
            shown = ", ".join(f"{b.name}(mb {b.micro_batch})" for b in buckets[:6])
            lines.append(f"  {modality} buckets ({len(buckets)}): {shown}{' …' if len(buckets) > 6 else ''}")
        return "\n".join(lines)


def build_plan(config: PrepareConfig, s3_options: dict, run_id: str | None = None) -> Plan:
    """The stages of each modality, from the config alone (nothing is read, no model is loaded)."""
    run_id = run_id or new_run_id()
    cfg = to_dict(config)  # stages rebuild the dataclass inside the worker (style.md practice 4)
    ledger = ledger_name(run_id)
    plan = Plan(config, run_id)
    dec_res = config.decode.resources
    for modality in config.read.modalities:
        specs = [StageSpec(Decode, dict(config=cfg, modality=modality, s3_options=s3_options, ledger=ledger),
                           dec_res, False)]
        f = config.filter
        if f.enabled:
            specs.append(StageSpec(RuleFilter, dict(config=cfg, ledger=ledger), dec_res, False))
        caption_model = config.caption.audio_model if modality == C.AUDIO else config.caption.model
        if config.caption.enabled and caption_model:
            specs.append(StageSpec(Captioner, dict(config=cfg, modality=modality, ledger=ledger),
                                   config.caption.resources, True))
        score_model = {C.IMAGE: f.clip_model, C.AUDIO: f.clap_model}.get(modality)
        if f.enabled and score_model:
            specs.append(StageSpec(ScoreFilter, dict(config=cfg, modality=modality, ledger=ledger), f.resources, True))
        if f.enabled and (f.dedup_exact or f.dedup_perceptual):
            specs.append(StageSpec(Dedup, dict(config=cfg, index=dedup_name(run_id), ledger=ledger), dec_res, False))
        specs.append(StageSpec(Bucketize, dict(config=cfg, ledger=ledger), dec_res, False))
        e = config.encode
        if modality == C.IMAGE and e.enabled and e.vae:
            specs.append(StageSpec(VaeEncode, dict(config=cfg, ledger=ledger), e.vae_resources, True))
        else:
            specs.append(StageSpec(TensorEncode, dict(ledger=ledger), dec_res, False))
        if e.enabled and e.text_encoder:
            specs.append(StageSpec(TextEncode, dict(config=cfg, ledger=ledger), e.text_resources, True))
        specs.append(StageSpec(WriteShards, dict(config=cfg, run_id=run_id, ledger=ledger), config.write.resources,
                               False))
        plan.stages[modality] = specs
    return plan


# ---- running ----------------------------------------------------------------------------------------------------------
def apply_stage(ds, spec: StageSpec, run_id: str, modality: str):
    import ray

    r = spec.resources
    remote_args: dict[str, Any] = {"num_cpus": r.num_cpus}
    if r.num_gpus:
        remote_args["num_gpus"] = r.num_gpus
    if r.accelerator_type:
        remote_args["accelerator_type"] = r.accelerator_type
    if spec.actor:
        return ds.map_batches(spec.cls, fn_constructor_kwargs=spec.kwargs, batch_size=r.batch_size,
                              batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, r.concurrency)),
                              **remote_args)
    if r.concurrency:
        remote_args["compute"] = ray.data.TaskPoolStrategy(size=r.concurrency)
    return ds.map_batches(run_task_stage, fn_kwargs={"cls": spec.cls, "kwargs": spec.kwargs,
                                                     "cache_key": f"{run_id}-{modality}-{spec.cls.__name__}"},
                          batch_size=r.batch_size, batch_format="numpy", **remote_args)


def run_prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the job to completion; returns the stats written to OUTPUT/stats.json. Ray must be initialised."""
    import ray

    config.validate()
    wall_start = time.time()
    s3_options = resolve_storage("s3://", config.storage)
    out_options = options_for(config.output, s3_options)
    ray.data.DataContext.get_current().enable_progress_bars = config.progress

    state = OutputState(config.output, out_options).load()
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
    items = [it for k, it in unique.items() if k not in done]
    skipped = len(unique) - len(items)
    if config.read.limit:
        items = items[: config.read.limit]
    log.info("listed %d inputs (%d tars); %d already done; %d to process", listed, len(tars), skipped, len(items))

    plan = build_plan(config, s3_options)
    run_id = plan.run_id
    ledger = ray.remote(num_cpus=0)(Ledger).options(name=ledger_name(run_id)).remote(
        config.output, out_options, run_id, config.write.rejects_flush_rows)
    index = ray.remote(num_cpus=0)(DedupIndex).options(name=dedup_name(run_id)).remote(config.filter.phash_max_distance)
    ray.get(index.seed.remote(state.hash_records()))
    writers = [
        ray.remote(num_cpus=0)(ShardWriter).options(name=writer_name(run_id, i)).remote(
            config.output, out_options, run_id, config.write.samples_per_shard, state.next_indices())
        for i in range(config.write.num_writers)
    ]
    ray.get(ledger.add.remote(C.STAGE_READ, **{"in": listed, "out": len(items), "skipped_done": skipped,
                                                "duplicate_inputs": listed - len(unique)}))
    log.info("plan:\n%s", plan.describe())

    run_start = time.time()
    try:
        for modality, specs in plan.stages.items():
            rows = [it for it in items if it[C.MODALITY] == modality]
            if not rows:
                continue
            blocks = max(1, math.ceil(len(rows) / max(1, config.decode.resources.batch_size)))
            ds = ray.data.from_arrow(items_table(rows), override_num_blocks=min(blocks, 10_000))
            for spec in specs:
                ds = apply_stage(ds, spec, run_id, modality)
            for _ in ds.iter_batches(batch_size=None):
                pass
        totals = ray.get([w.flush.remote() for w in writers])
        ray.get(ledger.flush.remote())
        snapshot = ray.get(ledger.snapshot.remote())
    finally:
        for handle in [ledger, index, *writers]:
            ray.kill(handle)
    elapsed = time.time() - run_start

    state = OutputState(config.output, out_options).load()
    manifest, rejects = state.write_tables()
    stats = make_stats(run_id, snapshot, totals, manifest, rejects, elapsed, time.time() - wall_start)
    state.write_json(C.STATS_FILE, stats)
    return stats


def make_stats(run_id, snapshot, totals, manifest, rejects, elapsed, wall) -> dict[str, Any]:
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
            **{k: int(v) for k, v in c.items() if k in ("skipped_done", "duplicate_inputs")},
        }
    by_reason: dict[str, dict[str, int]] = {}
    for stage, reason in zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist()):
        by_reason.setdefault(stage, {}).setdefault(reason, 0)
        by_reason[stage][reason] += 1
    written = sum(t["samples"] for t in totals)
    return {
        "run_id": run_id,
        "run": {"stages": stages, "written_samples": written, "written_shards": sum(t["shards"] for t in totals),
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
    return "\n".join(lines)
