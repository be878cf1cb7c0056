"""Text encoders through transformers: decoder-only LLMs (Gemma-2B by default; Qwen, InternLM, any ``AutoModel``) and T5
encoders (for audio / music).

Lumina-Next conditions on an LLM's hidden states (paper §3.3, multilingual generation with decoder LLMs;
docs/official-formats.md#text-encoder, docs/design-decisions.md#text-encoders-and-caption-width):
- features = ``hidden_states[-2]`` of Gemma-2B: the output of the second-to-last decoder layer, *before* the final norm;
- **right padding** (forced here: Gemma's saved tokenizer pads left), padding to the longest prompt rounded up to a
  multiple of 8, at most 256 tokens, truncation;
- the empty prompt "" is just [BOS]: what the CFG-unconditional branch and caption dropout see.
T5 encoders use ``last_hidden_state`` (after the final norm) by default.

Loaded from a local path or a hub id; nothing here downloads on its own (tests build tiny random models locally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_ENCODER_KINDS = ("decoder", "t5")
DEFAULT_LAYER = {"decoder": -2, "t5": -1}
MAX_LENGTH = 256
PAD_TO_MULTIPLE_OF = 8


@dataclass
class TextEncoderConfig:
    path: str | None = None  # local folder or hub id
    kind: str = "decoder"
    layer: int | None = None  # hidden_states index; None: -2 for decoders (Gemma), -1 for T5
    max_length: int = MAX_LENGTH
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF

    def __post_init__(self):
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"unknown text-encoder kind {self.kind!r}; choose one of {', '.join(TEXT_ENCODER_KINDS)}")
        if self.max_length < 1 or self.pad_to_multiple_of < 1:
            raise ValueError("max_length and pad_to_multiple_of must be ≥ 1")


def feature_width(config) -> int:
    """The width of the features a text encoder gives, from its transformers config (decoders: hidden_size; T5:
    d_model; multimodal configs: their text_config's)."""
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "hidden_size", None) or config.d_model)


def hidden_size_of(path: str) -> int:
    """The feature width of the text encoder at ``path``, from its config alone (no weights are read)."""
    from transformers import AutoConfig

    from models.storage import local_path

    try:
        config = AutoConfig.from_pretrained(local_path(path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read a text-encoder config from {path!r}: {exc}") from exc
    return feature_width(config)


class TextEncoder(torch.nn.Module):
    """Frozen tokenizer + encoder: ``encode(prompts) -> (feats (B, L, D), mask (B, L) bool)``."""

    def __init__(self, tokenizer, model: torch.nn.Module, kind: str = "decoder", layer: int | None = None,
                 max_length: int = MAX_LENGTH, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF):
        super().__init__()
        TextEncoderConfig(kind=kind, layer=layer, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the official code sets it explicitly; Gemma's default is left
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.layer = DEFAULT_LAYER[kind] if layer is None else layer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_pretrained(cls, path: str, kind: str = "decoder", layer: int | None = None, max_length: int = MAX_LENGTH,
                        pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        from models.storage import local_path

        TextEncoderConfig(kind=kind, layer=layer, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        path = local_path(path)  # s3:// folders are fetched once into the local cache
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            loader = T5EncoderModel if kind == "t5" else AutoModel  # AutoModel strips a causal-LM head if present
            model = loader.from_pretrained(path, dtype=dtype) if dtype is not None else loader.from_pretrained(path)
        except OSError as exc:
            raise FileNotFoundError(f"cannot load a {kind} text encoder from {path!r}: {exc}") from exc
        return cls(tokenizer, model.to(device), kind, layer, max_length, pad_to_multiple_of)

    @classmethod
    def from_config(cls, config: TextEncoderConfig, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> TextEncoder:
        if not config.path:
            raise ValueError("the text-encoder config has no path")
        return cls.from_pretrained(config.path, config.kind, config.layer, config.max_length,
                                   config.pad_to_multiple_of, device, dtype)

    @property
    def hidden_size(self) -> int:
        return feature_width(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(prompts), padding=True, pad_to_multiple_of=self.pad_to_multiple_of, max_length=self.max_length,
            truncation=True, return_tensors="pt",
        )
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        # A tokenizer without BOS (Qwen, T5 without EOS) gives the empty prompt no token at all; attention and the
        # masked mean-pool need one, so an empty row gets a single BOS/EOS/PAD token (in a batch of empty prompts only,
        # the batch first gets the one padded column it lacks).
        empty = ~mask.any(1)
        if bool(empty.any()):
            tok = self.tokenizer
            filler = next(i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 0) if i is not None)
            if ids.shape[1] == 0:
                width = self.pad_to_multiple_of or 1
                ids = torch.full((ids.shape[0], width), filler, dtype=ids.dtype)
                mask = torch.zeros(ids.shape[0], width, dtype=torch.bool)
            ids[empty, 0] = filler
            mask[empty, 0] = True
        return {"input_ids": ids, "attention_mask": mask}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats (B, L, D) in the encoder's dtype, mask (B, L) bool), L a multiple of ``pad_to_multiple_of``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        batch = self.tokenize(prompts)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        feats = out.hidden_states[self.layer]
        return feats, mask
