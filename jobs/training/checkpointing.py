"""Training checkpoints: a DeepSpeed ZeRO-3 checkpoint inside a Ray Train checkpoint
(docs/architecture.md#training-checkpoints).

One Ray checkpoint folder ``{storage}/{name}/checkpoint_{step:08d}/`` holds:

    ds/                     DeepSpeed: every rank's zero_pp_rank_* model + optimizer partitions, mp_rank_00_model_states
    latest                  DeepSpeed's pointer to the tag "ds"
    ema.safetensors         the full fp32 EMA (gathered from the partitions; world-size independent)
    train_state.json        step, world size, the loader state (data.LoaderState) and the model config
    train_config.json       the whole TrainJobConfig (docs/architecture.md#design-rules)
    ranks/{r}.json          rank r's files and their sizes: the checkpoint is complete when every rank's are there

Every rank writes its own files into a local folder and reports it; Ray Train merges the folders in storage
(ray.train.report), in the background by default (``run.checkpoint_upload``), while training goes on. Ray Train resumes
from the checkpoints it registered (complete by construction); what reads a run's storage itself (``jobs.export``, the
resume's batch check) takes the newest checkpoint whose rank lists are all present with every file at its size
(``is_complete``), so an upload cut short by a kill is passed over. Resuming on the same number of workers loads the DeepSpeed checkpoint as is; on another number the
DeepSpeed checkpoint is first converted to DeepSpeed's *universal* format (world-size independent), and the loader
re-cuts its remaining samples (data.SampleOrder.adopt). Export consolidates the partitions offline with DeepSpeed's
``zero_to_fp32`` (no processes, no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.storage import filesystem, join

log = logging.getLogger(__name__)

DS_TAG = "ds"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"
EMA_FILE = "ema.safetensors"
CHECKPOINT_PREFIX = "checkpoint_"
RANKS_DIR = "ranks"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def save(folder: str, engine, ema, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into the local ``folder``. Every rank must call it (collectives)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": state["step"]})
    full_ema = ema.full_state() if ema is not None else None  # all-gather: every rank joins
    if rank == 0:
        if full_ema is not None:
            save_file({k: v.contiguous() for k, v in full_ema.items()}, os.path.join(folder, EMA_FILE))
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)
    files = {os.path.relpath(os.path.join(d, n), folder): os.path.getsize(os.path.join(d, n))
             for d, _, names in os.walk(folder) for n in names}
    os.makedirs(os.path.join(folder, RANKS_DIR), exist_ok=True)
    with open(os.path.join(folder, RANKS_DIR, f"{rank}.json"), "w") as f:
        json.dump(files, f, indent=1, sort_keys=True)


def is_complete(uri: str) -> tuple[bool, str]:
    """(whether the checkpoint folder ``uri`` holds every file each of its ranks wrote, at its size; what is missing).
    A checkpoint without rank lists (written before they existed) counts as complete once it has its state file."""
    fs, path = filesystem(uri)
    sizes = {p[len(path) + 1:]: info.get("size") for p, info in fs.find(path, detail=True).items()}
    if STATE_FILE not in sizes:
        return False, f"no {STATE_FILE}"
    if not any(name.startswith(f"{RANKS_DIR}/") for name in sizes):
        return True, ""
    world = int(json.loads(fs.cat_file(f"{path}/{STATE_FILE}"))["world"])
    for rank in range(world):
        listed = f"{RANKS_DIR}/{rank}.json"
        if listed not in sizes:
            return False, f"rank {rank}'s files are not there ({listed})"
        for name, size in json.loads(fs.cat_file(f"{path}/{listed}")).items():
            if sizes.get(name) != size:
                return False, f"rank {rank}'s {name} is {'missing' if name not in sizes else 'short'}"
    return True, ""


def read_state(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def read_latest_state(run_uri: str) -> dict[str, Any] | None:
    """The ``train_state.json`` of the run's newest checkpoint (local or s3://), or None before its first one."""
    try:
        uri = latest_checkpoint(run_uri)
    except FileNotFoundError:
        return None
    fs, path = filesystem(uri)
    return json.loads(fs.cat_file(f"{path}/{STATE_FILE}"))


def to_universal(folder: str) -> str:
    """Convert the DeepSpeed checkpoint in ``folder`` to DeepSpeed's universal format in a fresh local folder; returns
    that folder (its tag is ``DS_TAG``). Each rank converts on its own: no shared filesystem is assumed."""
    from deepspeed.checkpoint import ds_to_universal

    out = tempfile.mkdtemp(prefix="ds-universal-")
    args = argparse.Namespace(input_folder=os.path.join(folder, DS_TAG), output_folder=os.path.join(out, DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    with open(os.path.join(out, "latest_universal"), "w") as f:
        f.write(DS_TAG)
    return out


def load(folder: str, engine, ema, same_world: bool) -> None:
    """Restore engine (weights, optimizer, scheduler) and EMA from a checkpoint folder. Every rank must call it."""
    if same_world:
        engine.load_checkpoint(folder, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    else:
        universal = to_universal(folder)
        try:
            engine.load_checkpoint(universal, tag=DS_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        finally:
            shutil.rmtree(universal, ignore_errors=True)
    if ema is not None:
        path = os.path.join(folder, EMA_FILE)
        if os.path.exists(path):
            ema.load_full_state(load_file(path))
        else:  # a checkpoint written with EMA off: start the EMA from the restored weights
            log.warning("checkpoint has no %s; the EMA restarts from the current weights", EMA_FILE)


# ---------------------------------------------------------------------------------------------------------------------
# Offline side (jobs.export): find, fetch and consolidate a checkpoint.
def latest_checkpoint(uri: str) -> str:
    """``uri`` itself when it is a checkpoint folder (FileNotFoundError when it is incomplete), else the complete
    checkpoint with the highest step under the run ``uri`` (an incomplete newer one is logged and passed over)."""
    fs, path = filesystem(uri)
    if fs.exists(f"{path}/{STATE_FILE}"):
        complete, missing = is_complete(uri)
        if not complete:
            raise FileNotFoundError(f"checkpoint {uri!r} is incomplete ({missing}): an upload cut short; use an "
                                    "earlier checkpoint or the run folder (its newest complete one)")
        return uri
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if fs.isdir(path) else []
    # checkpoint_00000040 folders (not Ray Train's checkpoint_manager_snapshot.json beside them)
    for name in reversed([n for n in names if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", n)]):
        complete, missing = is_complete(join(uri, name))
        if complete:
            return join(uri, name)
        log.warning("passing over %s/%s: incomplete (%s)", uri, name, missing)
    raise FileNotFoundError(f"no complete training checkpoint ({STATE_FILE}) in {uri!r} or its {CHECKPOINT_PREFIX}* "
                            "folders")


def consolidate(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(raw fp32 weights, full EMA or None, train_state) of a local checkpoint folder, named like the model's own
    ``named_parameters`` (for LoRA runs: the peft-wrapped names)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    raw = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
    raw = {k: v.float() for k, v in raw.items()}
    ema_path = os.path.join(folder, EMA_FILE)
    ema = load_file(ema_path) if os.path.exists(ema_path) else None
    return raw, ema, read_state(folder)
