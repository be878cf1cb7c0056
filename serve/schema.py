"""HTTP schema: the OpenAI Images API shape (``POST /v1/images/generations``) plus our sampling fields.

The classes below check shape and type (unknown fields, types, bounded string lengths, a seed that fits int64, a size
of ASCII digits). ``request_models(limits)`` adds the service's quotas (``LimitsConfig``: n, steps, guidance, prompt
length) as field constraints: the Ingress validates with those classes and publishes their JSON schema as its OpenAPI
request bodies, so the schema is the configured limits and cannot drift from them (docs/architecture.md#http-api). What
makes a request valid for the model (size a multiple of its 16 px tokens and within ``sampler.max_side`` /
``max_pixels``, prompt tokens) is checked by the replica, through the same ``Sampler.resolve`` that ``jobs.generate``
uses."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from models.geometry import SIZE_PATTERN
from models.rope import ROPE_MODES
from models.schedules import SCHEDULES
from models.solvers import SOLVERS

MAX_SEED = 2**63 - 1


class _GenerationRequest(BaseModel):
    """The fields every generation route takes. Unknown fields are rejected (a typo must not silently fall back to a
    default)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=256, description="served model name; default model when absent")
    user: str | None = Field(default=None, max_length=256)
    negative_prompt: str | None = Field(default=None, max_length=100_000)
    steps: int | None = Field(default=None, description="solver steps (grid intervals)")
    solver: Literal[SOLVERS] | None = None  # type: ignore[valid-type]
    schedule: Literal[SCHEDULES] | None = None  # type: ignore[valid-type]
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class ImageGenerationRequest(_GenerationRequest):
    """``POST /v1/images/generations``: the OpenAI Images request plus our sampling fields."""

    prompt: str = Field(min_length=1, max_length=100_000,
                        description="text prompt; for a class-conditional model a class index or class name")
    n: int = Field(default=1, description="number of images (1 to the server's limit)")
    size: str | None = Field(default=None, max_length=16, pattern=SIZE_PATTERN,
                             description='"WxH" in pixels, multiples of 16')
    response_format: Literal["b64_json"] = "b64_json"
    rope_scaling: Literal[ROPE_MODES] | None = None  # type: ignore[valid-type]
    context_drop: bool | None = None


class AudioGenerationRequest(_GenerationRequest):
    """``POST /v1/audio/generations`` (audio models)."""

    prompt: str = Field(min_length=1, max_length=100_000, description="text prompt")
    structured_prompt: str | None = Field(
        default=None, max_length=100_000,
        description="the text of a dual text encoder's structured-caption part (default: the prompt)")
    n: int = Field(default=1, description="number of clips (1 to the server's limit)")
    duration: float | None = Field(default=None, allow_inf_nan=False,
                                   description="seconds per clip (default: the model's; at most sampler.max_duration)")
    response_format: Literal["b64_json", "wav", "flac"] = Field(
        default="b64_json", description='"b64_json": {"data": [{"b64_json": WAV bytes}]}; "wav" / "flac": the file '
                                        "itself (n = 1)")


class PointsGenerationRequest(_GenerationRequest):
    """``POST /v1/points/generations`` (point-cloud models, paper §5.3)."""

    prompt: str = Field(min_length=1, max_length=100_000,
                        description="text prompt; for a label-conditioned model a class index or class name")
    label: int | str | None = Field(default=None, union_mode="left_to_right",
                                    description="a label-conditioned model's class, by index or by class name "
                                                "(instead of prompt)")
    points: int | None = Field(default=None, description="points per cloud (default: the model's training density; "
                                                         "at most sampler.max_points)")
    n: int = Field(default=1, description="number of clouds (1 to the server's limit)")
    response_format: Literal["b64_json", "ply", "npy"] = Field(
        default="b64_json", description='"b64_json": {"data": [{"b64_json": PLY bytes}]}; "ply" / "npy": the file '
                                        "itself (n = 1)")


def request_models(limits) -> dict[str, type[_GenerationRequest]]:
    """The request class of each modality (the keys of ``serve.app.ROUTES``) with the quotas of ``limits`` (a
    ``LimitsConfig``) as field constraints: what the Ingress validates and what its OpenAPI schema publishes."""
    quotas = {
        "steps": (int | None, Field(default=None, ge=limits.min_steps, le=limits.max_steps,
                                    description="solver steps (grid intervals)")),
        # ≥ 0 is the sampler's rule (models/sampler.py); stated here too so the schema is what the server accepts
        "guidance_scale": (float | None, Field(default=None, ge=0, le=limits.max_guidance, allow_inf_nan=False)),
    }
    models = {}
    for modality, base in (("image", ImageGenerationRequest), ("audio", AudioGenerationRequest),
                           ("points", PointsGenerationRequest)):
        prompt, n = base.model_fields["prompt"], base.model_fields["n"]
        # a points request may name its class with label instead (the Ingress asks for exactly one of the two)
        prompt_type, prompt_default = (str | None, None) if "label" in base.model_fields else (str, ...)
        fields = dict(quotas,
                      prompt=(prompt_type, Field(default=prompt_default, min_length=1,
                                                 max_length=limits.max_prompt_chars, description=prompt.description)),
                      n=(int, Field(default=1, ge=1, le=limits.max_n,
                                    description=n.description.replace("the server's limit", str(limits.max_n)))))
        models[modality] = create_model(base.__name__, __base__=base, __doc__=base.__doc__, **fields)
    return models


class PointsData(BaseModel):
    b64_json: str  # a binary PLY file
    seed: int
    nfe: int
    latency_s: float
    points: int


class PointsResponse(BaseModel):
    created: int
    model: str
    data: list[PointsData]


class AudioData(BaseModel):
    b64_json: str  # a WAV file
    seed: int
    nfe: int
    latency_s: float
    duration: float
    sample_rate: int


class AudioResponse(BaseModel):
    created: int
    model: str
    data: list[AudioData]


class ImageData(BaseModel):
    b64_json: str
    seed: int
    nfe: int
    latency_s: float
    width: int
    height: int


class ImagesResponse(BaseModel):
    created: int
    model: str
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lumina-ray"
    modality: Literal["image", "audio", "points"] = "image"  # which route generates with it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
