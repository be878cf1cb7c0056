"""HTTP schema: the OpenAI Images API shape (``POST /v1/images/generations``) plus our sampling fields."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.rope import ROPE_MODES
from models.schedules import SCHEDULES
from models.solvers import SOLVERS

SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_SEED = 2**63 - 1


class ImageGenerationRequest(BaseModel):
    """Unknown fields are rejected (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000,
                        description="text prompt; for a class-conditional model a class index or class name")
    model: str | None = Field(default=None, max_length=256, description="served model name; default model when absent")
    n: int = Field(default=1, ge=1, le=1024, description="number of images (bounded by the server's limit)")
    size: str | None = Field(default=None, max_length=16, description='"WxH" in pixels, multiples of 16')
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = Field(default=None, max_length=256)
    negative_prompt: str | None = Field(default=None, max_length=100_000)
    steps: int | None = Field(default=None, ge=1, le=10_000, description="solver steps (grid intervals)")
    solver: Literal[SOLVERS] | None = None  # type: ignore[valid-type]
    schedule: Literal[SCHEDULES] | None = None  # type: ignore[valid-type]
    guidance_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    rope_scaling: Literal[ROPE_MODES] | None = None  # type: ignore[valid-type]
    context_drop: bool | None = None


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


def parse_size(size: str) -> tuple[int, int]:
    match = SIZE_PATTERN.match(size)
    if not match:
        raise ValueError(f'size {size!r} is not of the form "WxH" (for example "1024x768")')
    return int(match[1]), int(match[2])
