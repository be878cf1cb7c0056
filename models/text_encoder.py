"""Text encoders through transformers: decoder-only LLMs (Gemma-2B by default; Qwen, InternLM, any ``AutoModel``), T5
encoders (music), the CLAP text branch (audio), and stacks of them (the audio model's dual encoder).

Lumina-Next conditions on an LLM's hidden states (paper §3.3, multilingual generation with decoder LLMs;
docs/official-formats.md#text-encoder, docs/design-decisions.md#text-encoders-and-caption-width):
- features = ``hidden_states[-2]`` of Gemma-2B: the output of the second-to-last decoder layer, *before* the final norm;
- **right padding** (forced here: Gemma's saved tokenizer pads left), padding to the longest prompt rounded up to a
  multiple of 8, at most 256 tokens, truncation;
- the empty prompt "" is just [BOS]: what the CFG-unconditional branch and caption dropout see.
T5 encoders use ``last_hidden_state`` (after the final norm) by default. CLAP's text branch gives every token through
the model's own text projection (its width is ``projection_dim``), the per-token form of the pooled CLAP embedding.

The kind is read from the folder's config.json (``model_type``) unless given. A **stack** (paper §5.2: CLAP on the
caption plus T5 on the structured caption, concatenated along the sequence) is a folder with ``text_encoders.json``
naming its parts and the text field each reads (docs/design-decisions.md#the-dual-text-encoder): every place that takes
a text-encoder path takes a stack folder too.

Loaded from a local path or a hub id; nothing here downloads on its own (tests build tiny random models locally).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

TEXT_ENCODER_KINDS = ("auto", "decoder", "t5", "clap", "stack")
DEFAULT_LAYER = {"decoder": -2, "t5": -1, "clap": -1}
MAX_LENGTH = 256
PAD_TO_MULTIPLE_OF = 8
T5_MODEL_TYPES = ("t5", "mt5", "umt5")
CLAP_MODEL_TYPES = ("clap", "clap_text_model")

STACK_FILE = "text_encoders.json"  # a stack folder's description (``write_stack``)
STACK_FORMAT = "lumina-ray/text-encoders"
TEXT_FIELDS = ("caption", "structured_caption")  # what a stack part reads: the prompt, or the structured prompt


@dataclass
class TextEncoderConfig:
    path: str | None = None  # local folder, hub id, or a stack folder (text_encoders.json)
    kind: str = "auto"  # auto: from the folder (a stack, else config.json's model_type)
    layer: int | None = None  # hidden_states index; None: -2 for decoders (Gemma), -1 for T5 and CLAP
    max_length: int | None = None  # None: MAX_LENGTH; a stack's parts carry their own
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF

    def __post_init__(self):
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"unknown text-encoder kind {self.kind!r}; choose one of {', '.join(TEXT_ENCODER_KINDS)}")
        if (self.max_length is not None and self.max_length < 1) or self.pad_to_multiple_of < 1:
            raise ValueError("max_length and pad_to_multiple_of must be ≥ 1")


@dataclass(frozen=True)
class StackPart:
    """One encoder of a stack: its folder (relative to the stack folder, or absolute / a URL), the text it reads, and
    its ``TextEncoderConfig`` settings."""

    path: str
    field: str = "caption"
    kind: str = "auto"
    layer: int | None = None
    max_length: int | None = None

    def __post_init__(self):
        if self.field not in TEXT_FIELDS:
            raise ValueError(f"a stack part reads one of {', '.join(TEXT_FIELDS)}, got field {self.field!r}")
        if self.kind == "stack":
            raise ValueError("a stack part cannot itself be a stack")
        TextEncoderConfig(kind=self.kind, layer=self.layer, max_length=self.max_length)


def kind_of(config) -> str:
    """The kind of a transformers config: T5 and CLAP by ``model_type``, anything else a decoder LLM."""
    model_type = getattr(config, "model_type", "")
    if model_type in T5_MODEL_TYPES:
        return "t5"
    if model_type in CLAP_MODEL_TYPES:
        return "clap"
    return "decoder"


def feature_width(config) -> int:
    """The width of the features a text encoder gives, from its transformers config (decoders: hidden_size; T5:
    d_model; CLAP: its projection_dim; other multimodal configs: their text_config's)."""
    if getattr(config, "model_type", "") in CLAP_MODEL_TYPES:
        return int(config.projection_dim)
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "hidden_size", None) or config.d_model)


# ---- stacks: text_encoders.json ---------------------------------------------------------------------------------------
def read_stack(path: str) -> list[StackPart] | None:
    """The parts of the stack folder at ``path`` (local or a URL), their paths resolved against it; None when ``path``
    is not a stack (no text_encoders.json there: a single encoder's folder, or a hub id)."""
    from models.config_io import ConfigError, from_dict
    from models.storage import filesystem, is_remote, join

    try:
        fs, root = filesystem(str(path))
        if not fs.exists(f"{root}/{STACK_FILE}"):
            return None
        with fs.open(f"{root}/{STACK_FILE}", "r") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise ValueError(f"{path}/{STACK_FILE} is not valid JSON: {exc}") from exc
        return None
    if not isinstance(data, dict) or data.get("format") != STACK_FORMAT or not data.get("encoders"):
        raise ValueError(f"{path}/{STACK_FILE} must be {{\"format\": {STACK_FORMAT!r}, \"encoders\": [...]}} with "
                         "at least one encoder")
    parts = []
    for i, entry in enumerate(data["encoders"]):
        try:
            part = from_dict(StackPart, entry, _where=f"{STACK_FILE} encoders[{i}]")
        except ConfigError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if not (part.path.startswith("/") or is_remote(part.path)):
            part = StackPart(join(str(path), part.path), part.field, part.kind, part.layer, part.max_length)
        parts.append(part)
    return parts


def write_stack(path: str, parts: list[StackPart | dict]) -> str:
    """Write a stack folder's text_encoders.json (``path`` local or a URL); returns ``path``. Part paths are written
    as given: relative ones resolve against the stack folder wherever it is copied."""
    import dataclasses

    from models.storage import filesystem

    parts = [p if isinstance(p, StackPart) else StackPart(**p) for p in parts]
    fs, root = filesystem(str(path))
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{STACK_FILE}", "w") as f:
        json.dump({"format": STACK_FORMAT, "encoders": [dataclasses.asdict(p) for p in parts]}, f, indent=2)
    return str(path)


def describe(path: str, kind: str = "auto", layer: int | None = None, max_length: int | None = None,
             read_config: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """What a text encoder's features depend on, from config files alone (no weights): ``{"kind", "layer",
    "max_length", "pad_to_multiple_of", "hidden_size"}`` (a stack: kind "stack", layer and max_length None — its parts
    carry their own). ``read_config(folder)`` gives a transformers config (default: ``AutoConfig`` of the cached
    folder). Raises FileNotFoundError when no config can be read, ValueError for a stack whose widths differ."""
    TextEncoderConfig(kind=kind, layer=layer, max_length=max_length)
    if read_config is None:
        read_config = _auto_config
    parts = read_stack(path) if kind in ("auto", "stack") else None
    if parts is not None:
        if layer is not None or max_length is not None:
            raise ValueError(f"{path} is a text-encoder stack: its parts set their own layer and max_length in "
                             f"{STACK_FILE}")
        widths = {p.path: describe(p.path, p.kind, p.layer, p.max_length, read_config)["hidden_size"] for p in parts}
        if len(set(widths.values())) > 1:
            raise ValueError(f"the encoders of the stack {path} give features of different widths "
                             f"({', '.join(f'{k}: {v}' for k, v in widths.items())}); their sequences concatenate, so "
                             "they must be equally wide")
        return {"kind": "stack", "layer": None, "max_length": None, "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
                "hidden_size": next(iter(widths.values()))}
    if kind == "stack":
        raise FileNotFoundError(f"no {STACK_FILE} at {path}: not a text-encoder stack")
    config = read_config(path)
    kind = kind_of(config) if kind == "auto" else kind
    return {"kind": kind, "layer": DEFAULT_LAYER[kind] if layer is None else int(layer),
            "max_length": MAX_LENGTH if max_length is None else int(max_length),
            "pad_to_multiple_of": PAD_TO_MULTIPLE_OF, "hidden_size": feature_width(config)}


def _auto_config(path: str):
    from transformers import AutoConfig

    from models.storage import local_path

    try:
        return AutoConfig.from_pretrained(local_path(path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read a text-encoder config from {path!r}: {exc}") from exc


def hidden_size_of(path: str) -> int:
    """The feature width of the text encoder (or stack) at ``path``, from its config alone (no weights are read)."""
    return describe(path)["hidden_size"]


class TextEncoder(torch.nn.Module):
    """Frozen tokenizer + encoder: ``encode(prompts) -> (feats (B, L, D), mask (B, L) bool)``. It reads the caption
    only (``fields``); ``encode``'s ``structured`` argument is for stacks."""

    fields = ("caption",)

    def __init__(self, tokenizer, model: torch.nn.Module, kind: str = "decoder", layer: int | None = None,
                 max_length: int | None = MAX_LENGTH, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF):
        super().__init__()
        if kind not in DEFAULT_LAYER:
            raise ValueError(f"a loaded text encoder's kind is one of {', '.join(DEFAULT_LAYER)}, got {kind!r}")
        max_length = MAX_LENGTH if max_length is None else max_length
        TextEncoderConfig(kind=kind, layer=layer, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the official code sets it explicitly; Gemma's default is left
        # A fast tokenizer's padding and truncation are settings of its one Rust object, set by every call: calls from
        # two threads with different settings (token_count's none, tokenize's) break each other's batch. Samplers of
        # one base share their text encoder (models/lora.py), and a server counts tokens while another thread encodes.
        self._tokenizer_lock = threading.Lock()
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.layer = DEFAULT_LAYER[kind] if layer is None else layer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_pretrained(cls, path: str, kind: str = "auto", layer: int | None = None, max_length: int | None = None,
                        pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> TextEncoder | TextEncoderStack:
        """Load the encoder at ``path``, or the stack (a ``TextEncoderStack``) when ``path`` is a stack folder. ``kind``
        auto: config.json's ``model_type`` says decoder, T5 or CLAP."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer, ClapTextModelWithProjection, T5EncoderModel

        from models.storage import local_path

        TextEncoderConfig(kind=kind, layer=layer, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        parts = read_stack(path) if kind in ("auto", "stack") else None
        if parts is not None:
            if layer is not None or max_length is not None:
                raise ValueError(f"{path} is a text-encoder stack: its parts set their own layer and max_length in "
                                 f"{STACK_FILE}")
            encoders = [cls.from_pretrained(p.path, p.kind, p.layer, p.max_length, pad_to_multiple_of, device, dtype)
                        for p in parts]
            return TextEncoderStack(encoders, [p.field for p in parts], pad_to_multiple_of)
        if kind == "stack":
            raise FileNotFoundError(f"no {STACK_FILE} at {path}: not a text-encoder stack")
        path = local_path(path)  # s3:// folders are fetched once into the local cache
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            kind = kind_of(AutoConfig.from_pretrained(path)) if kind == "auto" else kind
            # AutoModel strips a causal-LM head if present; T5 and CLAP keep only their text encoders
            loader = {"t5": T5EncoderModel, "clap": ClapTextModelWithProjection}.get(kind, AutoModel)
            model = loader.from_pretrained(path, dtype=dtype) if dtype is not None else loader.from_pretrained(path)
        except OSError as exc:
            raise FileNotFoundError(f"cannot load a {kind} text encoder from {path!r}: {exc}") from exc
        return cls(tokenizer, model.to(device), kind, layer, max_length, pad_to_multiple_of)

    @classmethod
    def from_config(cls, config: TextEncoderConfig, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> TextEncoder | TextEncoderStack:
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
        with self._tokenizer_lock:
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

    def token_count(self, prompt: str, structured: str | None = None) -> int:
        """Tokens of ``prompt`` before truncation (what a server's prompt-length limit counts)."""
        with self._tokenizer_lock:
            return len(self.tokenizer(prompt)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str], structured: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats (B, L, D) in the encoder's dtype, mask (B, L) bool), L a multiple of ``pad_to_multiple_of``.
        ``structured`` is not read: one encoder reads the caption (``fields``)."""
        prompts = _prompt_list(prompts)
        batch = self.tokenize(prompts)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        feats = out.hidden_states[self.layer]
        if self.kind == "clap":  # every token through CLAP's text projection (the pooled embedding's projection)
            feats = self.model.text_projection(feats)
        return feats, mask


class TextEncoderStack(torch.nn.Module):
    """Several encoders, each on its own text field, their features concatenated along the sequence (paper §5.2: CLAP
    on the caption, T5 on the structured caption). Each row holds the valid tokens of every part in order, then right
    padding to a multiple of ``pad_to_multiple_of``: the same right-padded form one encoder gives, so every consumer
    (caption dropout, precomputed features, the sampler's padding) treats a stack as one encoder."""

    kind = "stack"
    layer = None
    max_length = None

    def __init__(self, encoders: list[TextEncoder], fields: list[str], pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF):
        super().__init__()
        if not encoders or len(encoders) != len(fields):
            raise ValueError("a stack needs at least one encoder and one field per encoder")
        widths = [e.hidden_size for e in encoders]
        if len(set(widths)) > 1:
            raise ValueError(f"the stack's encoders give features of widths {widths}; their sequences concatenate, so "
                             "they must be equally wide")
        unknown = [f for f in fields if f not in TEXT_FIELDS]
        if unknown:
            raise ValueError(f"a stack part reads one of {', '.join(TEXT_FIELDS)}, got {unknown}")
        self.encoders = torch.nn.ModuleList(encoders)
        self.fields = tuple(fields)
        self.pad_to_multiple_of = pad_to_multiple_of

    @property
    def hidden_size(self) -> int:
        return self.encoders[0].hidden_size

    @property
    def device(self) -> torch.device:
        return self.encoders[0].device

    def token_count(self, prompt: str, structured: str | None = None) -> int:
        """The most tokens any part gives its text, before truncation."""
        texts = {"caption": prompt, "structured_caption": prompt if structured is None else structured}
        return max(e.token_count(texts[f]) for e, f in zip(self.encoders, self.fields))

    @torch.no_grad()
    def encode(self, prompts: list[str], structured: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats (B, L, D), mask (B, L) bool) of the concatenated parts; ``structured`` (one per prompt; None: the
        prompts themselves) is what the ``structured_caption`` parts read."""
        prompts = _prompt_list(prompts)
        structured = prompts if structured is None else _prompt_list(structured)
        if len(structured) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(structured)} structured prompts")
        parts = [e.encode(structured if f == "structured_caption" else prompts) for e, f in zip(self.encoders,
                                                                                                 self.fields)]
        lengths = [[int(n) for n in mask.sum(1).tolist()] for _, mask in parts]
        total = [sum(row) for row in zip(*lengths)]
        multiple = self.pad_to_multiple_of
        width = -(-max(total) // multiple) * multiple
        dtype = parts[0][0].dtype
        feats = torch.zeros(len(prompts), width, self.hidden_size, dtype=dtype, device=self.device)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=self.device)
        for b in range(len(prompts)):
            start = 0
            for (part, _), n in zip(parts, (row[b] for row in lengths)):
                feats[b, start:start + n] = part[b, :n].to(dtype)
                start += n
            mask[b, :start] = True
        return feats, mask


def _prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode() needs at least one prompt")
    return prompts
