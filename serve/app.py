"""The Ray Serve application: an HTTP ingress (FastAPI) in front of sampler replicas.

    client ──HTTP──► Ingress (auth, validation, fan-out of n, timeouts, 4xx/503/504)
                        └─handle──► SamplerReplica (text encoder + Next-DiT + VAE; @serve.batch; @serve.multiplexed)

``build_app(args)`` is the application builder: ``serve run serve.app:build_app`` / ``serve deploy serve/config.yaml`` /
a KubeRay RayService all use it; ``python -m jobs.serve`` wraps it for local use.
"""


import asyncio
import base64
import collections
import copy
import hmac
import io
import json
import logging
import random
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from models.config_io import from_dict, to_dict
from models.geometry import parse_size
from serve.config import ServeConfig
from serve.schema import (
    MAX_SEED,
    AudioResponse,
    ErrorResponse,
    ImagesResponse,
    ModelCard,
    ModelList,
    PointsResponse,
    request_models,
)

log = logging.getLogger("serve")

GENERATIONS_PATH = "/v1/images/generations"
AUDIO_PATH = "/v1/audio/generations"
POINTS_PATH = "/v1/points/generations"
ROUTES = {"image": GENERATIONS_PATH, "audio": AUDIO_PATH, "points": POINTS_PATH}  # the route of each modality
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
# What awaiting a sampler replica's response raises when no replica can answer it: the replica's actor died or cannot
# be reached (RayActorError: ActorDiedError, ActorUnavailableError), its process or node died, the replica chosen is
# gone, or the deployment has failed to deploy. The replica's fault, not the request's: a 503 with Retry-After while
# Serve replaces it (docs/architecture.md#health-and-readiness).
REPLICA_UNAVAILABLE = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError,
                       DeploymentUnavailableError)


def cancel(responses) -> None:
    """Best-effort cancel of handle calls. ``DeploymentResponse.cancel()`` raises the error of a call that has already
    failed (the BackPressureError of a refused one, …): that call needs no cancelling, and its error must not replace
    the response the caller is building."""
    for response in responses:
        try:
            response.cancel()
        except Exception:  # noqa: BLE001
            pass


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------------
class LoadedModel:
    """What a sampler replica's multiplex cache holds for one model id: its sampler, and what to undo when Serve evicts
    it. Serve's multiplexer calls a cached object's ``__del__`` on eviction (ray.serve.multiplex), and the garbage
    collector may call it again: ``release`` runs once."""

    def __init__(self, sampler, release=None):
        self.sampler = sampler
        self.release = release

    def __del__(self):
        release, self.release = self.release, None
        if release is not None:
            release()


@serve.deployment(
    name="SamplerReplica",
    max_ongoing_requests=8,
    max_queued_requests=16,
    health_check_period_s=2,
    health_check_timeout_s=60,
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
        # the loaded bases (ModelSpec.base_key → its sampler and the loaded model ids that use it); changed only by
        # _load and _release, which Serve's multiplexer runs one at a time (under its model cache lock)
        self._bases: dict[tuple, tuple[Any, set[str]]] = {}
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
        # per model: the last measured seconds per cost unit of a solve's slot (ResolvedRequest.cost), which prices
        # a request before it runs (docs/sampling.md#cost-and-deadlines)
        self.unit_seconds: dict[str, collections.deque] = {}

    def _load(self, name: str) -> LoadedModel:
        """Model ``name`` for the multiplex cache. Model ids whose specs load the same base (``ModelSpec.base_key``)
        share one loaded base: a LoRA model id is its adapter loaded unmerged on it (models/lora.py), so a LoRA variant
        costs its adapter's weights instead of a copy of the model (docs/benchmarks.md#lora-adapters-on-one-base-cpu)."""
        spec = self.config.models[name]
        key = spec.base_key()
        if key not in self._bases:
            self._bases[key] = (self._from_pretrained(spec), set())
        base, users = self._bases[key]
        try:
            if spec.adapter is None:
                sampler = base.with_adapter(None)
            elif base.config.fp8:  # FP8 projections take no LoRA layers: this variant is a copy of its own, merged
                return LoadedModel(self._from_pretrained(spec, spec.adapter))
            else:
                sampler = base.load_adapter(name, spec.adapter)
            users.add(name)
        finally:
            if not users:  # loaded for this model id alone, which failed or holds a copy of its own: not kept
                del self._bases[key]
        log.info("loaded model %s from %s%s on %s", name, spec.path,
                 f" with the adapter {spec.adapter}" if spec.adapter else "", self.device)
        return LoadedModel(sampler, lambda: self._release(name))

    def _from_pretrained(self, spec, adapter: str | None = None):
        from models.sampler import Sampler

        # Every solve is padded to the batch size: its kernels never depend on the batch-mates — bit-identical in the
        # same slot, equal to rounding across slots (models/sampler.py).
        overrides = dict(self.config.sampler, batch_size=self.config.batching.max_batch_size)
        return Sampler.from_pretrained(spec.path, text_encoder=spec.text_encoder, vae=spec.vae, config=overrides,
                                       device=self.device, dtype=self.dtype, ema=spec.ema, adapter=adapter,
                                       vocoder=spec.vocoder)

    def _release(self, name: str) -> None:
        """Serve evicted model ``name``: unload its adapter, and its base once no loaded model id uses it."""
        spec = self.config.models[name]
        base, users = self._bases[spec.base_key()]
        users.discard(name)
        if spec.adapter is not None:
            base.adapters.delete(name)
        if not users:
            del self._bases[spec.base_key()]
        log.info("unloaded model %s", name)

    @serve.multiplexed(max_num_models_per_replica=4)  # model ids kept loaded per replica (LoRA ids share a base: _load)
    async def get_sampler(self, model_id: str):
        if model_id in self._preloaded:
            return self._preloaded.pop(model_id)
        return await asyncio.to_thread(self._load, model_id)

    def check_health(self) -> None:
        """Serve's health check (every health_check_period_s): a replica whose device failed or that can no longer
        load its default model (errors that are not a request's fault) raises, and Serve replaces it."""
        if self.fatal_error is not None:
            raise RuntimeError(f"sampler replica is broken: {self.fatal_error}")

    def ready(self) -> str:
        """The Ingress's readiness probe (GET /readyz): the default model's name. A replica answers only once its
        constructor has loaded the default model, so an answer means a replica is up with it; a broken one raises."""
        self.check_health()
        return self.config.default_model

    async def generate(self, request: dict) -> dict:
        """One image or clip for one request dict: fields of GenerationRequest plus ``modality`` (what the route
        generates: image or audio) and, for audio, ``audio_format``. Returns a result dict or {"error": …}."""
        model_id = serve.get_multiplexed_model_id() or self.config.default_model
        return await self.generate_batch(model_id, request)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate_batch(self, model_ids: list[str], requests: list[dict]) -> list[dict]:
        from models.sampler import GenerationCancelled

        results: list[dict | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, model_id in enumerate(model_ids):
            by_model.setdefault(model_id, []).append(i)
        for model_id, indices in by_model.items():
            try:
                sampler = (await self.get_sampler(model_id)).sampler
            except Exception as exc:  # noqa: BLE001 - the callers of this model get a 500; other models' still run
                log.exception("loading model %s failed", model_id)
                if model_id == self.config.default_model:
                    # reloaded after eviction from the multiplex cache: a replica that cannot load its default model
                    # is broken whatever the cause, so check_health fails and Serve replaces it
                    self.fatal_error = f"the default model {model_id} failed to load: {exc}"
                self.failures.inc(len(indices), tags={"reason": "internal"})
                for i in indices:
                    results[i] = {"error": {"status": 500, "message": f"model {model_id} failed to load: {exc}"}}
                continue
            valid = []
            for i in indices:
                problem = self._validate(sampler, requests[i])
                if problem:
                    self.failures.inc(tags={"reason": "invalid"})
                    results[i] = {"error": {"status": 400, "message": problem}}
                else:
                    valid.append(i)
            for i in list(valid):
                problem = self._over_budget(sampler, model_id, requests[i])
                if problem:
                    self.failures.inc(tags={"reason": "over_budget"})
                    results[i] = {"error": {"status": 400, "message": problem}}
                    valid.remove(i)
            if not valid:
                continue
            deadline = time.monotonic() + self.config.request_timeout_s  # the callers have had their 504 by then
            try:
                # Serve runs the sub-batches of different model ids at once (@serve.batch splits a batch by model id),
                # each solve in a thread here, and a cancelled batch's solve runs on to its deadline: two solves on one
                # shared base take turns, as Sampler.generate holds the base's adapter for its whole solve
                # (models/lora.py LoraAdapters.active)
                outputs = await asyncio.to_thread(self._run, sampler, model_id, [requests[i] for i in valid], deadline)
            except GenerationCancelled as exc:
                self.failures.inc(len(valid), tags={"reason": "timeout"})
                late = f"generation took longer than {self.config.request_timeout_s} s: {exc}"
                outputs = [{"error": {"status": 504, "message": late}}] * len(valid)
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
        if request.get("label") and sampler.model.config.conditioning != "class":
            return "label is for a label-conditioned model; this model takes a text prompt"
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

    def _over_budget(self, sampler, model_id: str, request: dict) -> str | None:
        """Why a request would overrun the request timeout, priced before it runs: its cost (ResolvedRequest.cost:
        latent elements × evaluations, × 2 with CFG) × the padded slots × the solves its n images need, at the seconds
        per unit this replica last measured for the model (the least of its last solves: overheads only inflate a
        measurement). None when it fits, or before any measurement (the deadline still bounds it)."""
        measured = self.unit_seconds.get(model_id)
        (plan,) = sampler.resolve([generation_request(request)])
        cost = plan.cost()
        if not measured or cost is None:
            return None
        slots = sampler.config.batch_size
        solves = -(-int(request.get("n") or 1) // slots)
        estimate = min(measured) * cost * slots * solves
        budget = self.config.request_timeout_s
        if estimate <= budget:
            return None
        return (f"this request would take about {estimate:.0f} s on this replica, over the {budget:g} s request budget "
                f"({solves} solve(s) of {cost:,} latent elements × evaluations per image, measured here at "
                f"{min(measured) * 1e6:.3g} µs each): ask for fewer steps, a smaller size or fewer images")

    def _run(self, sampler, model_id: str, requests: list[dict], deadline: float) -> list[dict]:
        from models.audio import audio_bytes
        from models.points import ply_bytes

        began = time.perf_counter()
        plans = [generation_request(r) for r in requests]
        results = sampler.generate(plans, should_stop=lambda: time.monotonic() > deadline)
        elapsed = time.perf_counter() - began
        costs = [plan.cost() for plan in sampler.resolve(plans)]
        if None not in costs:  # every solve is padded to the batch size: the units it ran are slots × its cost
            slots = sampler.config.batch_size
            units = sum(costs) / len(costs) * slots * -(-len(costs) // slots)
            self.unit_seconds.setdefault(model_id, collections.deque(maxlen=8)).append(elapsed / units)
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
ROUTE_KEYS = ("modality", "audio_format", "points_format", "label", "n")


def generation_request(request: dict):
    from models.sampler import GenerationRequest

    return GenerationRequest(**{k: v for k, v in request.items() if k not in ROUTE_KEYS})


# ----------------------------------------------------------------------------------------------------------------------
api = FastAPI(
    title="Lumina-Ray image generation",
    version="0.1.0",
    description="Next-DiT (Lumina-Next) text-to-image generation in the OpenAI Images API shape.",
    # The Ingress serves /openapi.json and /docs itself: the request bodies carry the configured limits, which only a
    # replica knows (serve.ingress freezes a copy of this app at import, before any config).
    openapi_url=None,
)


@api.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) in the OpenAI error shape, like every other error."""
    if exc.status_code == 404:
        message, code = f"no route {request.method} {request.url.path}", "not_found"
    elif exc.status_code == 405:
        message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return error(exc.status_code, message, code=code, headers=exc.headers)


@api.exception_handler(Exception)
async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Whatever a route did not handle is a JSON 500 in the OpenAI error shape, never Starlette's text/plain page. The
    exception goes to the log, not to the client: Starlette raises it again once this response is sent, and the Serve
    replica logs it with its traceback."""
    return error(500, "internal server error", kind="server_error", code="internal_error")


def openapi_document(limits) -> dict:
    """The OpenAPI document with the request body of each generation route generated from ``limits`` (the
    ``LimitsConfig`` the Ingress enforces). The routes read their JSON themselves, so that they control every error;
    FastAPI therefore knows the routes and responses but not the bodies."""
    document = copy.deepcopy(api.openapi())
    for modality, model in request_models(limits).items():
        schema = model.model_json_schema()
        document["paths"][ROUTES[modality]]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": schema}}}
    return document


def validation_error(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    location = [str(p) for p in first.get("loc", ())]
    param = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        return error(400, f"unknown field {param!r}", param=param, code="unknown_field")
    if first.get("type") == "model_type" and not location:
        return error(400, "the body must be a JSON object", code="invalid_body")
    if first.get("type") == "string_pattern_mismatch" and param == "size":
        return error(400, f"size {first.get('input')!r} is not of the form WIDTHxHEIGHT in ASCII digits, e.g. 1024x768",
                     param=param, code="invalid_value")
    return error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")


# The playground's page loads nothing from elsewhere and talks only to this app: the browser holds it to that, so a
# page edit that pulls in an outside script or sends the token elsewhere fails in the browser (and in its test).
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                  "media-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


# backpressure_config: the HTTP proxy's answer when every Ingress replica's queue is full (the proxy calls only the
# Ingress; the Ingress answers the SamplerReplica's back-pressure itself, as a JSON 503 with Retry-After)
@serve.deployment(name="Ingress", max_ongoing_requests=64, max_queued_requests=256, ray_actor_options={"num_cpus": 0.25},
                  backpressure_config={"status_code": 503, "retry_after_s": 2})
@serve.ingress(api)
class Ingress:
    def __init__(self, sampler, config: dict):
        self.sampler = sampler
        self.config = from_dict(ServeConfig, config)
        self.tokens = [t.encode() for t in self.config.tokens()]
        self.created = int(time.time())
        from importlib import resources

        from models.checkpoint import read_modality

        self.modalities = {name: read_modality(spec.path) for name, spec in self.config.models.items()}
        # read once here, so that an install without the page fails at deploy, not at a person's first visit
        self.playground_html = resources.files("serve").joinpath("playground.html").read_bytes()
        self.schemas = request_models(self.config.limits)  # by modality; their JSON schema is /openapi.json's
        self.openapi = openapi_document(self.config.limits)
        self.requests = Counter("lumina_http_requests", "HTTP requests by status", tag_keys=("status",))
        self.answered_at = float("-inf")  # time.monotonic() when a sampler replica last answered this Ingress

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
        """Liveness: this Ingress replica answers HTTP. It asks nothing of the samplers (that is /readyz), so a probe
        that restarts on failure never restarts a pod for a sampler that is loading or being replaced."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self):
        """Readiness: 200 only while a sampler replica is up with the default model loaded, else a 503 with
        Retry-After (docs/architecture.md#health-and-readiness)."""
        began = time.monotonic()
        timeout = self.config.ready_timeout_s
        response = None
        try:
            response = self.sampler.ready.remote()
            model = await asyncio.wait_for(response, timeout=timeout)
        except BackPressureError:
            # every replica is at max_ongoing_requests and the queue is full: up and generating, which is all readiness
            # asks; taking the pod out of the load balancer would move the load, not remove it
            return {"status": "ready", "model": self.config.default_model, "busy": True}
        except TimeoutError:
            cancel([response])
            if self.answered_at >= began:  # the probe waited behind generations that a replica answered meanwhile
                return {"status": "ready", "model": self.config.default_model, "busy": True}
            return self._not_ready(f"no sampler replica of {self.config.default_model!r} answered within {timeout} s "
                                   "(loading, restarting or failing to load)")
        except REPLICA_UNAVAILABLE as exc:
            return self._not_ready(f"no sampler replica of {self.config.default_model!r} is available: "
                                   f"{type(exc).__name__}")
        except RayTaskError as exc:  # ready() raised: the replica is broken and its health check fails too
            log.warning("readiness: %s", exc.cause or exc)  # the cause stays in the log: /readyz needs no token
            return self._not_ready("a sampler replica reports itself broken; Serve is replacing it")
        self.answered_at = time.monotonic()
        return {"status": "ready", "model": model}

    def _not_ready(self, message: str) -> JSONResponse:
        return error(503, message, kind="service_unavailable", code="not_ready",
                     headers={"Retry-After": str(self.config.retry_after_s)})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request):
        root_path = request.scope.get("root_path", "").rstrip("/")  # an app under a route prefix: what FastAPI does
        return dict(self.openapi, servers=[{"url": root_path}]) if root_path else self.openapi

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title=f"{api.title} - docs")

    @api.get("/", include_in_schema=False)
    async def playground(self):
        """The playground page (serve/playground.html, docs/architecture.md#playground): a form over the public API.
        It holds no secret, so it needs no token; the API calls it makes send the token typed into it."""
        return Response(self.playground_html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PLAYGROUND_CSP, "Cache-Control": "no-cache"})

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

    async def _body(self, request: Request, modality: str):
        """The validated body of a generation request to the route of ``modality``, or the error response (auth, media
        type, JSON, the schema with the quotas every route shares, the model, the seeds of the n outputs)."""
        if not self._authorised(request):
            return self._unauthorised()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return error(415, f"content type must be application/json, got {content_type or 'none'!r}",
                         code="unsupported_media_type")
        try:
            data = json.loads(await request.body())
        # ValueError: bad syntax or encoding (JSONDecodeError, UnicodeDecodeError), an integer of more than 4300 digits;
        # RecursionError: arrays or objects nested deeper than the interpreter's stack
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            return error(400, f"malformed JSON body: {reason}", code="invalid_json")
        try:
            body = self.schemas[modality].model_validate(data)
        except ValidationError as exc:
            return validation_error(exc)
        model = body.model or self.config.default_model
        if model not in self.config.models:
            return error(404, f"model {model!r} is not served; available: {', '.join(self.config.models)}",
                         param="model", code="model_not_found")
        label = getattr(body, "label", None)  # the points route: a class by index or name instead of a prompt
        if label is not None and body.prompt is not None:
            return error(400, "give a prompt or a label, not both", param="label")
        if label is None and body.prompt is None:
            return error(400, "prompt (or label) is required", param="prompt")
        if label is None and body.prompt.strip() == "":
            return error(400, "prompt is empty", param="prompt")
        if isinstance(label, int) and label < 0:
            return error(400, f"label {label} is not a class index (≥ 0)", param="label")
        # output i gets seed + i, and every reported seed must be one a client can send back: a base seed whose batch
        # would pass MAX_SEED is refused rather than wrapped (docs/architecture.md#http-api)
        if body.seed is not None and body.seed + body.n - 1 > MAX_SEED:
            return error(400, f"seed {body.seed} with n = {body.n} would give seed {body.seed + body.n - 1}, above the "
                              f"largest seed {MAX_SEED}: use a seed ≤ {MAX_SEED - body.n + 1}", param="seed",
                         code="seed_out_of_range")
        return body

    async def _fan_out(self, body, job: dict) -> list[dict] | JSONResponse:
        """The body's n requests (``job`` plus consecutive seeds) on the sampler replicas; their outputs or the error
        response (overload 503, no sampler replica 503, timeout 504, or the first failed request's status)."""
        model = body.model or self.config.default_model
        base_seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**31)
        calls = [{"prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": body.steps,
                  "solver": body.solver, "schedule": body.schedule, "guidance": body.guidance_scale, **job,
                  "n": body.n, "seed": base_seed + i} for i in range(body.n)]
        handle = self.sampler.options(multiplexed_model_id=model)
        retry_after = {"Retry-After": str(self.config.retry_after_s)}
        responses = []
        try:
            for call in calls:
                responses.append(handle.generate.remote(call))
            outputs = await asyncio.wait_for(asyncio.gather(*responses), timeout=self.config.request_timeout_s)
        except BaseException as exc:
            cancel(responses)  # the request has failed: free the replicas from its other outputs
            if isinstance(exc, BackPressureError):
                self.requests.inc(tags={"status": "503"})
                return error(503, "the server is overloaded; retry later", kind="server_overloaded",
                             headers=retry_after)
            if isinstance(exc, REPLICA_UNAVAILABLE):
                log.warning("a sampler replica is unavailable: %s: %s", type(exc).__name__, exc)
                self.requests.inc(tags={"status": "503"})
                return error(503, "no sampler replica is available (one is being replaced); retry later",
                             kind="service_unavailable", code="replica_unavailable", headers=retry_after)
            if isinstance(exc, TimeoutError):
                self.requests.inc(tags={"status": "504"})
                return error(504, f"generation took longer than {self.config.request_timeout_s} s", kind="timeout")
            raise  # anything else is a bug: internal_error answers it with a JSON 500
        self.answered_at = time.monotonic()
        failed = [o for o in outputs if "error" in o]
        if failed:
            status = failed[0]["error"]["status"]
            self.requests.inc(tags={"status": str(status)})
            return error(status, failed[0]["error"]["message"])
        self.requests.inc(tags={"status": "200"})
        return outputs

    @api.post(GENERATIONS_PATH, response_model=ImagesResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 500, 503, 504)})
    async def generations(self, request: Request):
        body = await self._body(request, "image")
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

    @api.post(AUDIO_PATH, response_model=AudioResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 500, 503, 504)})
    async def audio_generations(self, request: Request):
        """Clips from an audio model: WAV files as b64_json, or (n = 1) the WAV / FLAC file itself."""
        body = await self._body(request, "audio")
        if isinstance(body, JSONResponse):
            return body
        job = {"modality": "audio", "duration": body.duration, "structured_prompt": body.structured_prompt}
        return await self._file_outputs(body, job, "audio_format", "wav", "audio/{}", ("duration", "sample_rate"))

    @api.post(POINTS_PATH, response_model=PointsResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 500, 503, 504)})
    async def points_generations(self, request: Request):
        """Clouds from a point-cloud model: binary PLY files as b64_json, or (n = 1) the PLY / NPY file itself."""
        body = await self._body(request, "points")
        if isinstance(body, JSONResponse):
            return body
        media = "application/octet-stream" if body.response_format == "npy" else "application/x-ply"
        job = {"modality": "points", "points": body.points}
        if body.label is not None:  # an index is the class itself; a name is looked up as a class-name prompt
            job.update(label=True, prompt="" if isinstance(body.label, int) else body.label,
                       class_label=body.label if isinstance(body.label, int) else None)
        return await self._file_outputs(body, job, "points_format", "ply", media, ("points",))


def build_app(args: dict) -> serve.Application:
    """Application builder (``serve run serve.app:build_app`` with the ServeConfig fields as ``args``)."""
    config = from_dict(ServeConfig, dict(args))
    plain = to_dict(config)
    drain = {"graceful_shutdown_timeout_s": config.graceful_shutdown_s}
    return Ingress.options(**drain).bind(SamplerReplica.options(**drain).bind(plain), plain)
