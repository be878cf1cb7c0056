"""LoRA fine-tuning of a pretrained Next-DiT through peft (issue "LoRA fine-tuning … as a config switch").

``apply_lora`` freezes the base model and adds low-rank adapters to the attention and SwiGLU projections (the same
linear layers the official model shards); only adapters train, so ZeRO-3 holds optimizer state for them alone.
The export writes peft's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) beside nothing else:
the base weights are the pretrained folder named in ``model.init_from``.
"""

from __future__ import annotations

import torch

from jobs.training.config import LoRAConfig

ADAPTER_PREFIX = "base_model.model."  # what peft prepends to the wrapped model's parameter names


def lora_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none")


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """The peft-wrapped model: base parameters frozen, adapters trainable (B initialised to zero: starts as the base)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def adapter_state(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a (peft-named) state dict."""
    return {k: v for k, v in named.items() if "lora_" in k}


def save_adapter(base: torch.nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor], path: str) -> None:
    """Write ``weights`` (peft-named LoRA tensors) as a peft adapter folder, loadable with
    ``PeftModel.from_pretrained(NextDiT.from_pretrained(init_from), path)``."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(base, lora_config(cfg))
    result = set_peft_model_state_dict(peft_model, _adapter_names(weights))
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"LoRA weights do not fit the model: {result.unexpected_keys[:3]}")
    peft_model.save_pretrained(path)


def _adapter_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's set_peft_model_state_dict wants names without the adapter name ("lora_A.default.weight" → "lora_A.weight")."""
    return {k.replace(".default.", "."): v for k, v in adapter_state(weights).items()}
