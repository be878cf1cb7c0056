"""The Ray Serve application: an HTTP ingress (FastAPI) in front of sampler replicas.

    client ──HTTP──► Ingress (auth, validation, fan-out of n, timeouts, 4xx/503/504)
                        └─handle──► SamplerReplica (text encoder + Next-DiT + VAE; @serve.batch; @serve.multiplexed)

``build_app(args)`` is the application builder: ``serve run serve.app:build_app`` / ``serve deploy serve/config.yaml`` /
a KubeRay RayService all use it; ``python -m jobs.serve`` wraps it for local use.
"""


import asyncio
import base64
import hmac
import io
import json
import logging
import random
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter, Histogram

from models.config_io import from_dict, to_dict
from models.geometry import parse_size
from serve.config import ServeConfig
from serve.schema import (
    AudioGenerationRequest,
    AudioResponse,
    ErrorResponse,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    PointsGenerationRequest,
    PointsResponse,
)

log = logging.getLogger("serve")

GENERATIONS_PATH = "/v1/images/generations"
AUDIO_PATH = "/v1/audio/generations"
POINTS_PATH = "/v1/points/generations"
ROUTES = {"image": GENERATIONS_PATH, "audio": AUDIO_PATH, "points": POINTS_PATH}  # the route of each modality
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------------
@serve.deployment(
    name="SamplerReplica",
    max_ongoing_requests=8,
    max_queued_requests=16,
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=20,
    ray_actor_options={"num_cpus": 0.5},
)
class SamplerReplica:
    """Holds the samplers of one replica. Ready (and healthy) only once the default model has loaded."""

    def __init__(self, config: dict):
        import torch

        self.config = from_dict(ServeConfig, config)
        if self.config.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = self.config.device
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self._preloaded = {self.config.default_model: self._load(self.config.default_model)}
        self.fatal_error: str | None = None
        self.generate_batch.set_max_batch_size(self.config.batching.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)
        self.images = Counter("lumina_images_generated", "images generated", tag_keys=("model",))
        self.failures = Counter("lumina_generation_failures", "requests rejected or failed", tag_keys=("reason",))
        self.latency = Histogram("lumina_image_latency_s", "seconds per batched solve, by size",
                                 boundaries=LATENCY_BUCKETS, tag_keys=("size",))
        self.nfe = Histogram("lumina_image_nfe", "function evaluations per image",
                             boundaries=[2, 5, 10, 20, 40, 80, 160, 320])

    def _load(self, name: str):
        from models.sampler import Sampler

        spec = self.config.models[name]
        # Every solve is padded to the batch size: its kernels never depend on the batch-mates — bit-identical in the
        # same slot, equal to rounding across slots (models/sampler.py).
        overrides = dict(self.config.sampler, batch_size=self.config.batching.max_batch_size)
        sampler = Sampler.from_pretrained(spec.path, text_encoder=spec.text_encoder, vae=spec.vae, config=overrides,
                                          device=self.device, dtype=self.dtype, ema=spec.ema, adapter=spec.adapter,
                                          vocoder=spec.vocoder)
        log.info("loaded model %s from %s on %s", name, spec.path, self.device)
        return sampler

    @serve.multiplexed(max_num_models_per_replica=4)  # model folders / LoRA variants kept loaded per replica
    async def get_sampler(self, model_id: str):
        if model_id in self._preloaded:
            return self._preloaded.pop(model_id)
        return await asyncio.to_thread(self._load, model_id)

    def check_health(self) -> None:
        """Serve replaces a replica whose device failed (an error that is not the request's fault)."""
        if self.fatal_error is not None:
            raise RuntimeError(f"sampler replica is broken: {self.fatal_error}")

    async def generate(self, request: dict) -> dict:
        """One image or clip for one request dict: fields of GenerationRequest plus ``modality`` (what the route
        generates: image or audio) and, for audio, ``audio_format``. Returns a result dict or {"error": …}."""
        model_id = serve.get_multiplexed_model_id() or self.config.default_model
        return await self.generate_batch(model_id, request)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate_batch(self, model_ids: list[str], requests: list[dict]) -> list[dict]:
        results: list[dict | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, model_id in enumerate(model_ids):
            by_model.setdefault(model_id, []).append(i)
        for model_id, indices in by_model.items():
            sampler = await self.get_sampler(model_id)
            valid = []
            for i in indices:
                problem = self._validate(sampler, requests[i])
                if problem:
                    self.failures.inc(tags={"reason": "invalid"})
                    results[i] = {"error": {"status": 400, "message": problem}}
                else:
                    valid.append(i)
            if not valid:
                continue
            try:
                outputs = await asyncio.to_thread(self._run, sampler, [requests[i] for i in valid])
            except Exception as exc:  # noqa: BLE001 - report to every caller instead of failing the whole batch
                log.exception("generation failed")
                if isinstance(exc, RuntimeError) and "CUDA" in str(exc):
                    self.fatal_error = str(exc)
                self.failures.inc(len(valid), tags={"reason": "internal"})
                outputs = [{"error": {"status": 500, "message": f"generation failed: {exc}"}}] * len(valid)
            else:
                self.images.inc(len(valid), tags={"model": model_id})
            for i, out in zip(valid, outputs):
                results[i] = out
        return results  # type: ignore[return-value]

    def _validate(self, sampler, request: dict) -> str | None:
        modality = sampler.model.config.modality
        if request["modality"] != modality:
            article = "an" if modality[0] in "aeiou" else "a"
            return f"this is {article} {modality} model: use POST {ROUTES[modality]}"
        if sampler.text_encoder is not None:  # a class-conditional model has none: its prompt is a class index or name
            tokens = sampler.text_encoder.token_count(request["prompt"], request.get("structured_prompt"))
            limit = self.config.limits.max_prompt_tokens
            if tokens > limit:
                return f"prompt is {tokens} tokens long; the limit is {limit}"
        try:
            sampler.resolve([generation_request(request)])
        except ValueError as exc:
            return str(exc)
        return None

    def _run(self, sampler, requests: list[dict]) -> list[dict]:
        from models.audio import audio_bytes
        from models.points import ply_bytes

        began = time.perf_counter()
        results = sampler.generate([generation_request(r) for r in requests])
        elapsed = time.perf_counter() - began
        out = []
        for request, result in zip(requests, results):
            meta = result.metadata
            self.nfe.observe(meta["nfe"])
            common = {"seed": meta["seed"], "nfe": meta["nfe"], "seconds": meta.get("seconds", elapsed)}
            if result.points is not None:
                cloud = result.points
                if request.get("points_format") == "npy":
                    buffer = io.BytesIO()
                    np.save(buffer, cloud)
                    data = buffer.getvalue()
                else:
                    data = ply_bytes(cloud)
                out.append({"file": data, "points": int(cloud.shape[0]), **common})
                continue
            if result.audio is not None:
                data = audio_bytes(result.audio, result.sample_rate, request.get("audio_format") or "wav")
                out.append({"file": data, "duration": meta["duration"], "sample_rate": meta["sample_rate"],
                            **common})
                continue
            buffer = io.BytesIO()
            Image.fromarray(result.image).save(buffer, format="PNG")
            out.append({"png": buffer.getvalue(), "width": meta["width"], "height": meta["height"], **common})
        first = requests[0]
        size = (f"{first['duration']}s" if first.get("duration") else f"{first['points']}pts" if first.get("points")
                else f"{first.get('width')}x{first.get('height')}")
        self.latency.observe(elapsed, tags={"size": size})
        return out


# what a route adds to the GenerationRequest fields of a request dict
ROUTE_KEYS = ("modality", "audio_format", "points_format")


def generation_request(request: dict):
    from models.sampler import GenerationRequest

    return GenerationRequest(**{k: v for k, v in request.items() if k not in ROUTE_KEYS})


# ----------------------------------------------------------------------------------------------------------------------
api = FastAPI(
    title="Lumina-Ray image generation",
    version="0.1.0",
    description="Next-DiT (Lumina-Next) text-to-image generation in the OpenAI Images API shape.",
)


def body_doc(schema) -> dict:
    """The OpenAPI request body of a route that reads its JSON itself (so that it controls every error)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


REQUEST_BODY_DOC = body_doc(ImageGenerationRequest)
AUDIO_BODY_DOC = body_doc(AudioGenerationRequest)
POINTS_BODY_DOC = body_doc(PointsGenerationRequest)


def validation_error(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    location = [str(p) for p in first.get("loc", ())]
    param = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        return error(400, f"unknown field {param!r}", param=param, code="unknown_field")
    if first.get("type") == "model_type" and not location:
        return error(400, "the body must be a JSON object", code="invalid_body")
    return error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")


@serve.deployment(name="Ingress", max_ongoing_requests=64, max_queued_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(self, sampler, config: dict):
        self.sampler = sampler
        self.config = from_dict(ServeConfig, config)
        self.tokens = [t.encode() for t in self.config.tokens()]
        self.created = int(time.time())
        from models.checkpoint import read_modality

        self.modalities = {name: read_modality(spec.path) for name, spec in self.config.models.items()}
        self.requests = Counter("lumina_http_requests", "HTTP requests by status", tag_keys=("status",))

    def _authorised(self, request: Request) -> bool:
        if not self.tokens:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # compare against every token without short-circuit so timing reveals nothing
        matches = [hmac.compare_digest(given, expected) for expected in self.tokens]
        return any(matches)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def list_models(self, request: Request):
        if not self._authorised(request):
            return self._unauthorised()
        return ModelList(data=[ModelCard(id=name, created=self.created, modality=self.modalities[name])
                               for name in self.config.models])

    def _unauthorised(self) -> JSONResponse:
        self.requests.inc(tags={"status": "401"})
        return error(401, "missing or invalid bearer token", kind="authentication_error", code="invalid_api_key",
                     headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request, schema):
        """The validated body of a generation request, or the error response (auth, media type, JSON, schema, the
        model, and the quotas every route shares)."""
        if not self._authorised(request):
            return self._unauthorised()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return error(415, f"content type must be application/json, got {content_type or 'none'!r}",
                         code="unsupported_media_type")
        try:
            data = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error(400, f"malformed JSON body: {exc}", code="invalid_json")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            return validation_error(exc)
        limits = self.config.limits
        model = body.model or self.config.default_model
        if model not in self.config.models:
            return error(404, f"model {model!r} is not served; available: {', '.join(self.config.models)}",
                         param="model", code="model_not_found")
        if not 1 <= body.n <= limits.max_n:
            return error(400, f"n = {body.n} is outside 1..{limits.max_n}", param="n")
        if len(body.prompt) > limits.max_prompt_chars:
            return error(400, f"prompt is {len(body.prompt)} characters; the limit is {limits.max_prompt_chars}",
                         param="prompt")
        if body.steps is not None and not limits.min_steps <= body.steps <= limits.max_steps:
            return error(400, f"steps = {body.steps} is outside {limits.min_steps}..{limits.max_steps}", param="steps")
        if body.guidance_scale is not None and body.guidance_scale > limits.max_guidance:
            return error(400, f"guidance_scale {body.guidance_scale} is above {limits.max_guidance}",
                         param="guidance_scale")
        if body.prompt.strip() == "":
            return error(400, "prompt is empty", param="prompt")
        return body

    async def _fan_out(self, body, job: dict) -> list[dict] | JSONResponse:
        """The body's n requests (``job`` plus consecutive seeds) on the sampler replicas; their outputs or the error
        response (overload 503, timeout 504, or the first failed request's status)."""
        model = body.model or self.config.default_model
        base_seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**31)
        calls = [dict(job, prompt=body.prompt, negative_prompt=body.negative_prompt, seed=base_seed + i,
                      steps=body.steps, solver=body.solver, schedule=body.schedule, guidance=body.guidance_scale)
                 for i in range(body.n)]
        handle = self.sampler.options(multiplexed_model_id=model)
        try:
            responses = [handle.generate.remote(call) for call in calls]
            outputs = await asyncio.wait_for(asyncio.gather(*responses), timeout=self.config.request_timeout_s)
        except BackPressureError:
            self.requests.inc(tags={"status": "503"})
            return error(503, "the server is overloaded; retry later", kind="server_overloaded",
                         headers={"Retry-After": str(self.config.retry_after_s)})
        except TimeoutError:
            for response in responses:
                response.cancel()
            self.requests.inc(tags={"status": "504"})
            return error(504, f"generation took longer than {self.config.request_timeout_s} s", kind="timeout")
        failed = [o for o in outputs if "error" in o]
        if failed:
            status = failed[0]["error"]["status"]
            self.requests.inc(tags={"status": str(status)})
            return error(status, failed[0]["error"]["message"])
        self.requests.inc(tags={"status": "200"})
        return outputs

    @api.post(GENERATIONS_PATH, response_model=ImagesResponse,
              openapi_extra=REQUEST_BODY_DOC,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 500, 503, 504)})
    async def generations(self, request: Request):
        body = await self._body(request, ImageGenerationRequest)
        if isinstance(body, JSONResponse):
            return body
        width = height = None
        if body.size is not None:  # the replica checks the size against the model and sampler.max_side/max_pixels
            try:
                width, height = parse_size(body.size)
            except ValueError as exc:
                return error(400, str(exc), param="size")
        job: dict[str, Any] = {"modality": "image", "width": width, "height": height,
                               "context_drop": body.context_drop}
        if body.rope_scaling is not None:
            from models.rope import RopeScaling

            job["rope_scaling"] = RopeScaling(mode=body.rope_scaling)
        outputs = await self._fan_out(body, job)
        if isinstance(outputs, JSONResponse):
            return outputs
        data = [{"b64_json": base64.b64encode(o["png"]).decode(), "seed": o["seed"], "nfe": o["nfe"],
                 "latency_s": round(o["seconds"], 4), "width": o["width"], "height": o["height"]} for o in outputs]
        return {"created": int(time.time()), "model": body.model or self.config.default_model, "data": data}

    async def _file_outputs(self, body, job: dict, format_key: str, default_format: str, media_type: str,
                            fields: tuple[str, ...]):
        """The audio and points routes: each output is a file, as b64_json (``default_format``) or, for n = 1, the file
        itself in ``body.response_format`` (``media_type`` with ``{}`` for the format); ``fields`` of each output go
        with it into the JSON."""
        if body.response_format != "b64_json" and body.n != 1:
            return error(400, f"response_format {body.response_format} returns one file: n must be 1",
                         param="response_format")
        file_format = default_format if body.response_format == "b64_json" else body.response_format
        outputs = await self._fan_out(body, {**job, format_key: file_format})
        if isinstance(outputs, JSONResponse):
            return outputs
        if body.response_format != "b64_json":
            return Response(outputs[0]["file"], media_type=media_type.format(file_format),
                            headers={"X-Seed": str(outputs[0]["seed"])})
        data = [{"b64_json": base64.b64encode(o["file"]).decode(), "seed": o["seed"], "nfe": o["nfe"],
                 "latency_s": round(o["seconds"], 4), **{k: o[k] for k in fields}} for o in outputs]
        return {"created": int(time.time()), "model": body.model or self.config.default_model, "data": data}

    @api.post(AUDIO_PATH, response_model=AudioResponse, openapi_extra=AUDIO_BODY_DOC,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 500, 503, 504)})
    async def audio_generations(self, request: Request):
        """Clips from an audio model: WAV files as b64_json, or (n = 1) the WAV / FLAC file itself."""
        body = await self._body(request, AudioGenerationRequest)
        if isinstance(body, JSONResponse):
            return body
        job = {"modality": "audio", "duration": body.duration, "structured_prompt": body.structured_prompt}
        return await self._file_outputs(body, job, "audio_format", "wav", "audio/{}", ("duration", "sample_rate"))

    @api.post(POINTS_PATH, response_model=PointsResponse, openapi_extra=POINTS_BODY_DOC,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 500, 503, 504)})
    async def points_generations(self, request: Request):
        """Clouds from a point-cloud model: binary PLY files as b64_json, or (n = 1) the PLY / NPY file itself."""
        body = await self._body(request, PointsGenerationRequest)
        if isinstance(body, JSONResponse):
            return body
        media = "application/octet-stream" if body.response_format == "npy" else "application/x-ply"
        return await self._file_outputs(body, {"modality": "points", "points": body.points}, "points_format", "ply",
                                        media, ("points",))


def build_app(args: dict) -> serve.Application:
    """Application builder (``serve run serve.app:build_app`` with the ServeConfig fields as ``args``)."""
    config = from_dict(ServeConfig, dict(args))
    plain = to_dict(config)
    return Ingress.bind(SamplerReplica.bind(plain), plain)
