"""Training checkpoints: a DeepSpeed ZeRO-3 checkpoint inside a Ray Train checkpoint
(docs/architecture.md#training-checkpoints).

One Ray checkpoint folder ``{storage}/{name}/checkpoint_{step:08d}/`` holds:

    ds/                     DeepSpeed: every rank's zero_pp_rank_* model + optimizer partitions, mp_rank_00_model_states
    latest                  DeepSpeed's pointer to the tag "ds"
    ema.safetensors         the full fp32 EMA (gathered from the partitions; world-size independent)
    train_state.json        step, world size, the loader state (data.LoaderState) and the model config
    train_config.json       the whole TrainJobConfig (docs/architecture.md#design-rules)

Every rank writes its own files into a local folder and reports it; Ray Train merges the folders in storage
(ray.train.report). Resuming on the same number of workers loads the DeepSpeed checkpoint as is; on another number the
DeepSpeed checkpoint is first converted to DeepSpeed's *universal* format (world-size independent), and the loader
re-cuts its remaining samples (data.SampleOrder.adopt). Export consolidates the partitions offline with DeepSpeed's
``zero_to_fp32`` (no processes, no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    """``uri`` itself when it is a checkpoint folder, else the checkpoint with the highest step under the run ``uri``."""
    fs, path = filesystem(uri)
    if fs.exists(f"{path}/{STATE_FILE}"):
        return uri
    candidates = sorted(p for p in fs.ls(path, detail=False)
                        if p.rstrip("/").rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)
                        and fs.exists(f"{p.rstrip('/')}/{STATE_FILE}"))
    if not candidates:
        raise FileNotFoundError(f"no training checkpoint ({STATE_FILE}) in {uri!r} or its {CHECKPOINT_PREFIX}* folders")
    name = candidates[-1].rstrip("/").rsplit("/", 1)[-1]
    return join(uri, name)


def consolidate(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(raw fp32 weights, full EMA or None, train_state) of a local checkpoint folder, named like the model's own
    ``named_parameters`` (for LoRA runs: the peft-wrapped names)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    raw = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
    raw = {k: v.float() for k, v in raw.items()}
    ema_path = os.path.join(folder, EMA_FILE)
    ema = load_file(ema_path) if os.path.exists(ema_path) else None
    return raw, ema, read_state(folder)
