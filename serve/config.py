"""Typed configuration of the Serve application (the ``args`` of serve/config.yaml, or ``python -m jobs.serve``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from models.config_io import ConfigError, from_dict

TOKEN_ENV = "SERVE_API_TOKEN"  # comma-separated bearer tokens


@dataclass
class ModelSpec:
    """One servable model: a model folder (ours / official / diffusers, local or s3://); the text encoder and VAE
    default to the references recorded in the folder."""

    path: str = ""
    text_encoder: str | None = None
    vae: str | None = None
    vocoder: str | None = None  # audio models: a SpeechT5HifiGan folder or "griffin_lim" (None: Sampler's default)
    ema: bool = False
    # a LoRA adapter folder (jobs.export of a LoRA run) on `path`'s model: a replica loads it unmerged on the base it
    # shares with every model of the same base_key (docs/architecture.md#http-api)
    adapter: str | None = None

    def base_key(self) -> tuple:
        """What the model's base is loaded from: models with equal keys share one loaded base in a replica."""
        return (self.path, self.ema, self.text_encoder, self.vae, self.vocoder)


@dataclass
class LimitsConfig:
    """The service's quotas, checked by the Ingress as constraints of the request classes whose JSON schema is
    ``/openapi.json``'s (``serve.schema.request_models``), so a changed limit changes the schema. What makes a request
    valid for the model — the image size (``sampler.max_side`` / ``sampler.max_pixels``), steps ≥ 1, guidance ≥ 0 — is
    the sampler's to check."""

    max_n: int = 4  # images per request
    min_steps: int = 1
    max_steps: int = 100
    max_guidance: float = 30.0
    max_prompt_chars: int = 8000  # cheap check at the ingress; the token limit is checked by the replica's tokenizer
    max_prompt_tokens: int = 256  # captions are cut at 256 tokens in training (docs/official-formats.md#text-encoder)

    def __post_init__(self):
        if self.max_n < 1:
            raise ConfigError(f"serve config: limits.max_n must be ≥ 1, got {self.max_n}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"serve config: limits need 1 ≤ min_steps ≤ max_steps, got {self.min_steps}, "
                              f"{self.max_steps}")
        if self.max_guidance < 0:
            raise ConfigError(f"serve config: limits.max_guidance must be ≥ 0, got {self.max_guidance}")


@dataclass
class BatchingConfig:
    max_batch_size: int = 4  # requests per batched ODE solve (compatible requests only)
    batch_wait_timeout_s: float = 0.05


@dataclass
class ServeConfig:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    default_model: str = ""  # "" → the first entry of `models`
    api_tokens: list[str] = field(default_factory=list)  # empty: SERVE_API_TOKEN; both empty: no auth
    request_timeout_s: float = 300.0
    # how long a stopping replica lets its in-flight requests finish, and the bound on `jobs.serve`'s whole shutdown
    # after SIGTERM / Ctrl-C (docs/architecture.md#shutdown); Kubernetes kills a pod 30 s after its SIGTERM by default
    graceful_shutdown_s: float = 20.0
    retry_after_s: int = 2  # Retry-After of 503 responses (overload, no sampler replica, not ready)
    # how long GET /readyz waits for a sampler replica to answer (docs/architecture.md#health-and-readiness)
    ready_timeout_s: float = 2.0
    device: str = "auto"  # auto: cuda when present
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # SamplerConfig fields (steps, solver, schedule, guidance, max_side, max_pixels, max_duration, …) or a preset
    # ({preset: official}). The merge order is SamplerConfig's defaults ← the model folder's ← these ← the request's
    # fields, so this stays the partial dict the user wrote (a full SamplerConfig could not tell which fields it sets); it is
    # checked against SamplerConfig here, so a typo or a bad value fails `--dry-run` and `serve deploy`.
    sampler: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.models:
            raise ConfigError("serve config: `models` is empty; name at least one model folder")
        for name, spec in self.models.items():
            if not spec.path:
                raise ConfigError(f"serve config: model {name!r} has no path")
        if not self.default_model:
            self.default_model = next(iter(self.models))
        if self.default_model not in self.models:
            raise ConfigError(f"serve config: default_model {self.default_model!r} is not one of {list(self.models)}")
        if self.graceful_shutdown_s <= 0:
            raise ConfigError(f"serve config: graceful_shutdown_s must be > 0, got {self.graceful_shutdown_s}")
        if self.ready_timeout_s <= 0:
            raise ConfigError(f"serve config: ready_timeout_s must be > 0, got {self.ready_timeout_s}")
        if self.batching.max_batch_size < 1:
            raise ConfigError("serve config: batching.max_batch_size must be ≥ 1")
        from models.sampler import SamplerConfig  # torch: only where a config is built

        from_dict(SamplerConfig, self.sampler, _where="serve config: sampler")
        if "batch_size" in self.sampler:  # one knob: the replica's @serve.batch size is the solve's batch
            raise ConfigError("serve config: set batching.max_batch_size, not sampler.batch_size")

    def tokens(self) -> list[str]:
        """Accepted bearer tokens: the config's, else the comma-separated SERVE_API_TOKEN."""
        if self.api_tokens:
            return list(self.api_tokens)
        return [t.strip() for t in os.environ.get(TOKEN_ENV, "").split(",") if t.strip()]
