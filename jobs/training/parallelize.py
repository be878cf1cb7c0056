"""Everything applied to the model from outside it, in one documented order (docs/architecture.md#design-rules):

    build (seeded init or ``model.init_from``; under ZeRO-3 already partitioned) → LoRA (peft; freezes the base)
    → activation checkpointing → ZeRO-3 leaf blocks → compiled block forwards
    → DeepSpeed ZeRO-3 engine (AdamW, clipping, warm-up, bf16/fp32) → EMA over the engine's parameter partitions.

The model never branches on any of these. The EMA lives here too because under ZeRO-3 it must follow the engine's
partitioning: every rank keeps the fp32 EMA of its own partition of every parameter (no gather per step), and the full
EMA is assembled with an all-gather that every rank joins (ZeRO-3 gathers are collectives:
docs/architecture.md#stack-pitfalls).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

import torch

from jobs.training.config import TrainJobConfig
from models import NextDiT, NextDiTConfig, preset

log = logging.getLogger(__name__)


def quiet_deepspeed(gpu: bool) -> None:
    """Stop, in this worker before DeepSpeed loads, the messages that every rank repeats without news, which flooded a
    training log ("repeated 120x across cluster"): DeepSpeed calls torch.distributed's ``all_gather_into_tensor`` /
    ``reduce_scatter_tensor``, which torch marks deprecated with a FutureWarning per call site and rank, and on a CPU
    worker it warns that it fell back to its CPU accelerator — named here through ``DS_ACCELERATOR``, as the run asks
    for it (``scaling.gpu``). A user's own ``DS_ACCELERATOR`` stays."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", category=FutureWarning, message=deprecated)


def model_config(cfg: TrainJobConfig) -> NextDiTConfig:
    """The architecture: what the driver resolved (``model.resolved``, trainer.resolve_model); without it, the
    pretrained folder's when fine-tuning, else the preset with overrides."""
    if cfg.model.resolved is not None:
        return cfg.model.resolved
    if cfg.model.init_from:
        from models.checkpoint import read_config

        return read_config(cfg.model.init_from)
    overrides = dict(cfg.model.overrides)
    if cfg.train.task == "class":
        overrides.setdefault("conditioning", "class")
    return preset(cfg.model.preset, **overrides)


def build_model(cfg: TrainJobConfig, device: str | torch.device = "cpu", world: int | None = None) -> NextDiT:
    """The model with its initial weights: seeded (identical on every rank) or loaded from ``model.init_from``.

    Given the ``world`` of a run whose engine will partition it (ZeRO-3, ``deepspeed.zero_init``, no LoRA), it is built
    already partitioned across that world; the weights are those of the unpartitioned build."""
    if world is not None and builds_partitioned(cfg):
        return build_partitioned(cfg, world)
    if cfg.model.init_from:
        return NextDiT.from_pretrained(cfg.model.init_from, ema=cfg.model.init_ema).to(device)
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        return NextDiT(model_config(cfg))


def builds_partitioned(cfg: TrainJobConfig) -> bool:
    return cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init and not cfg.lora.enabled


def build_partitioned(cfg: TrainJobConfig, world: int) -> NextDiT:
    """``deepspeed.zero.Init``: each module's parameters are partitioned as soon as the module is constructed (on the
    current accelerator, in the engine's dtype), and ``NextDiT.initialize_weights`` runs through ``Module.apply``, which
    DeepSpeed wraps to gather a module around its initialisation. Every rank joins every gather (collectives)."""
    import deepspeed

    deepspeed.init_distributed()  # over the existing process group (as deepspeed.initialize does): zero.Init needs it
    torch.manual_seed(cfg.train.seed)
    # mem_efficient_linear=False: DeepSpeed would otherwise replace F.linear process-wide, for good.
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world), mem_efficient_linear=False):
        model = NextDiT(model_config(cfg))
    if cfg.model.init_from:
        load_partitioned(model, cfg.model.init_from, cfg.model.init_ema)
    return model


def load_partitioned(model: NextDiT, path: str, ema: bool = False) -> None:
    """Copy a checkpoint into a partitioned model, one module at a time: only rank 0 reads the checkpoint (one copy of
    the weights per run, not per rank); each module's parameters are gathered on every rank, written on rank 0, and
    broadcast and re-partitioned by DeepSpeed when the gather closes."""
    import deepspeed
    import torch.distributed as dist

    state = NextDiT.from_pretrained(path, ema=ema).state_dict() if dist.get_rank() == 0 else None
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            if state is not None:
                for name, param in params.items():
                    param.copy_(state[f"{prefix}.{name}" if prefix else name])


def use_bf16(cfg: TrainJobConfig) -> bool:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and DeepSpeed's CPU path is meant for correctness)."""
    if cfg.train.precision == "auto":
        return cfg.scaling.gpu
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: TrainJobConfig, world: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict. The micro-batch size changes per bucket, so DeepSpeed is given a nominal 1; it only
    uses it for its own data loader and timers, while the gradient-accumulation count is what scales the loss."""
    o = cfg.optim
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage, "overlap_comm": cfg.deepspeed.overlap_comm,
                            "contiguous_gradients": True}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.grad_accum * world,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU (DeepSpeed's fused Adam needs CUDA); decoupled weight decay = AdamW.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": cfg.deepspeed.torch_adam or not cfg.scaling.gpu, "adam_w_mode": True},
        },
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,  # our metrics module reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if o.warmup_steps > 0:
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": o.lr, "warmup_num_steps": o.warmup_steps, "warmup_type": "linear"}}
    return config


def parallelize(model: torch.nn.Module, cfg: TrainJobConfig, world: int, load_universal: bool = False):
    """LoRA → activation checkpointing → DeepSpeed. Returns the engine (``engine.module`` is the wrapped model)."""
    import deepspeed

    if cfg.lora.enabled:
        from jobs.training.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    if cfg.train.activation_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_activation_checkpointing(True, every=cfg.train.activation_checkpointing_every)
    # Not under LoRA: DeepSpeed's leaf-module backward then misses the frozen base weights (seen with peft: "size of
    # tensor a (0) must match …"); per-submodule gathers handle them.
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.gather_whole_blocks and not cfg.lora.enabled:
        from deepspeed.utils import set_z3_leaf_modules

        from models.nextdit import TransformerBlock

        set_z3_leaf_modules(model, [TransformerBlock])
    if cfg.train.compile:
        compile_blocks(model.get_base_model() if hasattr(model, "get_base_model") else model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      config=deepspeed_config(cfg, world, load_universal))
    return engine


# A compile per bucket shape (the proportional-attention scale is a Python float, so dynamo specialises on it): room for
# the bucket ladders of jobs.prepare before dynamo would give up and run the blocks eagerly.
BUCKET_RECOMPILES = 64


def compile_blocks(model: NextDiT) -> None:
    """torch.compile the ``forward`` of every transformer block, not the module call: DeepSpeed's ZeRO-3 hooks (gather
    before, release after, re-gather for backward) stay outside the graph, in eager, and activation checkpointing
    recomputes through the compiled forward. Identical blocks share one compiled graph per input shape."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BUCKET_RECOMPILES)
    for block in model.layers:
        block.forward = torch.compile(block.forward)


def is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


class ShardedEMA:
    """EMA (decay 0.9999, every optimizer step) of the trainable parameters, kept where the engine keeps them.

    Under ZeRO-3 each rank holds the fp32 EMA of its own partition of each parameter, updated from the optimizer's
    fp32 master partition (``safe_get_local_fp32_param``), so no communication happens per step. ``full_state`` and
    ``load_full_state`` convert to and from full tensors with the partition rule of ZeRO-3 (rank r holds elements
    [r·p, (r+1)·p) of the flattened parameter, p = ceil(numel / world)), so an EMA saved on N workers loads on M.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        import torch.distributed as dist

        self.decay = decay
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.shadow = {name: self._local(p).detach().float().clone() for name, p in self.params}

    @staticmethod
    def _local(p: torch.nn.Parameter) -> torch.Tensor:
        if is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        return p.detach()

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params:
            self.shadow[name].mul_(self.decay).add_(self._local(p).float(), alpha=1.0 - self.decay)

    def _partition(self, p: torch.nn.Parameter) -> int:
        return math.ceil(p.ds_numel / self.world)

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors on CPU, on every rank. A collective: every rank must call it."""
        import torch.distributed as dist

        out = {}
        for name, p in self.params:
            local = self.shadow[name]
            if not is_zero3(p):
                out[name] = local.cpu().clone()
                continue
            size = self._partition(p)
            padded = torch.zeros(size, dtype=torch.float32, device=local.device)
            padded[: local.numel()] = local.reshape(-1)
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
            out[name] = torch.cat(parts)[: p.ds_numel].reshape(p.ds_shape).cpu()
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted({n for n, _ in self.params} - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for name, p in self.params:
            full = state[name].float().reshape(-1)
            local = self.shadow[name]
            if is_zero3(p):
                start = self.rank * self._partition(p)
                local.reshape(-1).copy_(full[start:start + local.numel()].to(local.device))
            else:
                local.copy_(full.reshape(local.shape).to(local.device))
