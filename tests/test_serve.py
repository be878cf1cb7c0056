"""The Serve application over real HTTP: a local Ray cluster, the app with tiny random models, httpx as the client."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from models import preset
from models.config_io import from_dict, to_dict
from models.tiny import make_tiny_audio_vae, make_tiny_text_encoder_stack, random_nextdit
from tests.conftest import free_port
from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATH = "/v1/images/generations"
AUDIO = "/v1/audio/generations"


def serve_config(folders: dict[str, dict], **overrides) -> dict:
    config = {
        "models": folders,
        "api_tokens": [TOKEN],
        "request_timeout_s": 60.0,
        "limits": {"max_n": 2, "max_steps": 4, "max_prompt_tokens": 24},
        "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.05},
        "sampler": {"steps": 2, "solver": "euler", "max_side": 128, "max_pixels": 128 * 96, "max_duration": 2.0},
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    te, vae = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    base = make_tiny_model_folder(root / "m0", te, vae, seed=0)
    return {"tiny": {"path": base},
            "tiny-b": {"path": make_tiny_model_folder(root / "m1", te, vae, seed=1)},
            "tiny-lora": {"path": base, "adapter": make_lora_adapter(base, root / "lora")},
            # a second LoRA variant of the same base, other targets and weights: both share one base in a replica
            "tiny-lora-2": {"path": base, "adapter": make_lora_adapter(base, root / "lora-2", seed=1,
                                                                     target_modules=("wk", "w1"))},
            "tiny-class": {"path": make_tiny_model_folder(root / "class", vae=vae, preset_name="tiny-class",
                                                          class_names=[f"shape {i}" for i in range(10)])},
            # the audio model conditions on the paper's dual encoder (CLAP + T5 stack, paper §5.2)
            "tiny-audio": {"path": make_tiny_model_folder(root / "audio", make_tiny_text_encoder_stack(root / "dual"),
                                                          make_tiny_audio_vae(root / "mel-vae"),
                                                          preset_name="tiny-audio")},
            "tiny-points": {"path": make_tiny_model_folder(root / "points", te, preset_name="tiny-points")},
            # the paper's label-conditioned point model (ShapeNet classes): a class by index or name
            "tiny-points-label": {"path": make_tiny_model_folder(
                root / "points-label", model=random_nextdit(preset("tiny-points", conditioning="class")),
                class_names=["sphere", "cube", "cylinder"])}}


def make_lora_adapter(base: str, path, **options) -> str:
    """A peft LoRA adapter on the base folder's model with non-zero weights (what a LoRA run's export writes);
    ``options``: those of ``models.tiny.make_lora_adapter``."""
    from models import NextDiT
    from models.tiny import make_lora_adapter as make_adapter

    return make_adapter(NextDiT.from_pretrained(base), path, **options)


def start_app(config: dict, name: str, route_prefix: str, sampler_options: dict | None = None):
    from ray import serve

    from serve.app import Ingress, SamplerReplica

    sampler = SamplerReplica.options(**(sampler_options or {})).bind(config)
    serve.run(Ingress.bind(sampler, config), name=name, route_prefix=route_prefix)


@pytest.fixture(scope="module")
def server(ray_cluster, folders):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    start_app(serve_config(folders), "lumina", "/")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client
    serve.shutdown()


def generate(client, **body):
    return client.post(PATH, json={"prompt": "a red circle", **body}, headers=AUTH)


def decode_png(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_valid_request_returns_png_of_the_requested_size_and_same_seed_same_bytes(server):
    first = generate(server, size="48x32", seed=7)
    assert first.status_code == 200, first.text
    item = first.json()["data"][0]
    image = decode_png(item)
    assert image.format == "PNG" and image.size == (48, 32)
    assert item["seed"] == 7 and item["nfe"] == 2 and item["latency_s"] > 0
    again = generate(server, size="48x32", seed=7)
    assert again.json()["data"][0]["b64_json"] == item["b64_json"]
    other = generate(server, size="48x32", seed=8)
    assert other.json()["data"][0]["b64_json"] != item["b64_json"]


def assert_same_image_to_rounding(item: dict, expected: dict) -> None:
    """What models/sampler.py promises across slots of a batched solve: the same image to 8-bit rounding (a BLAS may
    round a matmul row according to its index, and a pixel next to a rounding boundary may then move one level)."""
    a, b = (np.asarray(decode_png(i), dtype=np.int16) for i in (item, expected))
    diff = np.abs(a - b)
    assert a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), diff.mean())


def test_n_images_get_consecutive_seeds_and_batch_mates_do_not_change_an_image(server):
    alone = generate(server, size="32x32", seed=100).json()["data"][0]
    pair = generate(server, size="32x32", seed=99, n=2).json()["data"]
    assert [d["seed"] for d in pair] == [99, 100]
    assert_same_image_to_rounding(pair[1], alone)  # slot 1 of the solve, slot 0 alone
    # concurrent requests share batched solves (in whichever slot); each image stays what it is alone
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda s: generate(server, size="32x32", seed=s).json(), [100, 5, 100, 6]))
    for body in (bodies[0], bodies[2]):
        assert_same_image_to_rounding(body["data"][0], alone)


def test_models_health_and_openapi(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    ready = server.get("/readyz")  # a sampler replica is up with the default model
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": "tiny"}, ready.text
    models = server.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny", "tiny-b", "tiny-lora", "tiny-lora-2", "tiny-class",
                                                 "tiny-audio", "tiny-points", "tiny-points-label"]
    assert [m["modality"] for m in models["data"]] == ["image"] * 5 + ["audio", "points", "points"]
    schema = server.get("/openapi.json").json()
    assert PATH in schema["paths"] and "requestBody" in schema["paths"][PATH]["post"]
    assert "requestBody" in schema["paths"][AUDIO]["post"]
    # the published bodies are the limits of this app's config (serve_config: max_n 2, max_steps 4)
    for route in (PATH, AUDIO, POINTS):
        fields = body_fields(schema, route)
        assert fields["n"]["maximum"] == 2 and bounds(fields["steps"]) == (1, 4), route
    assert server.get("/docs").status_code == 200
    # routing errors are in the OpenAI error shape too
    missing = server.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", missing.text
    wrong = server.get(PATH, headers=AUTH)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed", wrong.text
    assert "POST" in wrong.headers["allow"]


def body_fields(schema: dict, route: str) -> dict:
    return schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def bounds(field: dict) -> tuple:
    """(minimum, maximum) of an optional field's non-null branch."""
    branch = next(b for b in field.get("anyOf", [field]) if b.get("type") != "null")
    return branch.get("minimum"), branch.get("maximum")


def test_openapi_request_bodies_are_generated_from_the_configured_limits():
    import re

    from serve.app import openapi_document
    from serve.config import LimitsConfig
    from serve.schema import request_models

    for limits in (LimitsConfig(), LimitsConfig(max_n=3, min_steps=2, max_steps=9, max_guidance=7.5,
                                                max_prompt_chars=50)):
        document = openapi_document(limits)
        for route in (PATH, AUDIO, POINTS):
            fields = body_fields(document, route)
            assert fields["n"]["maximum"] == limits.max_n and fields["n"]["minimum"] == 1
            assert bounds(fields["steps"]) == (limits.min_steps, limits.max_steps)
            assert bounds(fields["guidance_scale"]) == (0, limits.max_guidance)
            prompt = next(b for b in fields["prompt"].get("anyOf", [fields["prompt"]]) if b["type"] == "string")
            assert prompt["maxLength"] == limits.max_prompt_chars  # optional on the points route (or a label)
        pattern = next(b for b in body_fields(document, PATH)["size"]["anyOf"] if b["type"] == "string")["pattern"]
        # the pattern reads the same in a JSON-schema client: ASCII digits only
        assert re.search(pattern, "64x64") and not re.search(pattern, "６４x６４") and not re.search(pattern, "٦٤x٦٤")
        # and the server validates with the classes the schema was generated from
        image = request_models(limits)["image"]
        image.model_validate({"prompt": "x" * limits.max_prompt_chars, "n": limits.max_n, "size": "64x64"})
        for bad in ({"n": limits.max_n + 1}, {"steps": limits.max_steps + 1}, {"steps": limits.min_steps - 1},
                    {"guidance_scale": limits.max_guidance + 0.5}, {"prompt": "x" * (limits.max_prompt_chars + 1)},
                    {"size": "６４x６４"}):
            with pytest.raises(ValueError):
                image.model_validate({"prompt": "x", **bad})


def clip(client, **body):
    return client.post(AUDIO, json={"prompt": "a low hum", "model": "tiny-audio", **body}, headers=AUTH)


def test_audio_models_return_wav_clips_of_the_asked_duration(server):
    import soundfile

    first = clip(server, duration=0.5, seed=4, n=2)
    assert first.status_code == 200, first.text
    data = first.json()["data"]
    assert [d["seed"] for d in data] == [4, 5] and data[0]["duration"] == 0.5 and data[0]["sample_rate"] == 16_000
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
    assert rate == 16_000 and samples.shape == (8_000,)
    again = clip(server, duration=0.5, seed=4).json()["data"][0]
    assert again["b64_json"] == data[0]["b64_json"]  # same seed, same bytes
    flac = clip(server, duration=0.5, seed=4, response_format="flac")
    assert flac.status_code == 200 and flac.headers["content-type"] == "audio/flac"
    samples, rate = soundfile.read(io.BytesIO(flac.content))
    assert rate == 16_000 and samples.shape == (8_000,) and flac.headers["x-seed"] == "4"
    # the dual encoder's T5 part reads structured_prompt (default: the prompt itself)
    tagged = clip(server, duration=0.5, seed=4, structured_prompt="genre: ambient, tempo: slow")
    same = clip(server, duration=0.5, seed=4, structured_prompt="a low hum")
    assert tagged.status_code == same.status_code == 200, tagged.text
    assert same.json()["data"][0]["b64_json"] == data[0]["b64_json"] != tagged.json()["data"][0]["b64_json"]


@pytest.mark.parametrize("body,match", [
    ({"duration": 3.0}, "exceeds the maximum of 2.0 s"),  # the serve config's sampler.max_duration
    ({"duration": -1}, "positive number of seconds"),
    ({"n": 2, "response_format": "wav"}, "returns one file: n must be 1"),
    ({"model": "tiny"}, "this is an image model: use POST /v1/images/generations"),
    ({"size": "32x32"}, "unknown field 'size'"),
    ({"structured_prompt": 3}, "structured_prompt"),
])
def test_bad_audio_requests_get_400(server, body, match):
    response = clip(server, **body)
    assert response.status_code == 400 and match in response.json()["error"]["message"], response.text


POINTS = "/v1/points/generations"


def test_point_models_return_ply_clouds_of_the_asked_density(server):
    import trimesh

    first = server.post(POINTS, json={"prompt": "a chair", "model": "tiny-points", "points": 1024, "seed": 7,
                                      "n": 2, "steps": 2}, headers=AUTH)
    assert first.status_code == 200, first.text
    data = first.json()["data"]
    assert [d["seed"] for d in data] == [7, 8] and data[0]["points"] == 1024
    cloud = trimesh.load(io.BytesIO(base64.b64decode(data[0]["b64_json"])), file_type="ply")
    assert np.asarray(cloud.vertices).shape == (1024, 3)
    raw = server.post(POINTS, json={"prompt": "a chair", "model": "tiny-points", "points": 1024, "seed": 7,
                                    "steps": 2, "response_format": "npy"}, headers=AUTH)
    assert raw.status_code == 200 and raw.headers["x-seed"] == "7"
    np.testing.assert_array_equal(np.load(io.BytesIO(raw.content)), np.asarray(cloud.vertices, dtype=np.float32))
    default = server.post(POINTS, json={"prompt": "a chair", "model": "tiny-points", "steps": 2}, headers=AUTH)
    assert default.json()["data"][0]["points"] == 256  # the training density


def test_a_label_point_model_takes_a_label_by_index_or_name(server):
    def cloud(**body):
        response = server.post(POINTS, json={"model": "tiny-points-label", "points": 300, "seed": 2, "steps": 2,
                                             "response_format": "npy", **body}, headers=AUTH)
        assert response.status_code == 200, response.text
        return np.load(io.BytesIO(response.content))

    by_index = cloud(label=1)
    assert by_index.shape == (300, 3)
    np.testing.assert_array_equal(cloud(label="Cube"), by_index)
    np.testing.assert_array_equal(cloud(prompt="cube"), by_index)  # the prompt names a class as well
    assert not np.array_equal(cloud(label=2), by_index)


@pytest.mark.parametrize("body,match", [
    ({"model": "tiny-points-label", "label": 3}, "class label 3 is outside [0, 3)"),
    ({"model": "tiny-points-label", "label": "chair"}, "neither a class index"),
    ({"model": "tiny-points-label", "label": -1}, "label -1 is not a class index"),
    ({"model": "tiny-points-label", "label": 1, "prompt": "cube"}, "give a prompt or a label, not both"),
    ({"model": "tiny-points-label"}, "prompt (or label) is required"),
    ({"model": "tiny-points", "label": 1}, "label is for a label-conditioned model"),
    ({"model": "tiny-points", "label": "cube"}, "label is for a label-conditioned model"),
])
def test_bad_labels_get_400(server, body, match):
    response = server.post(POINTS, json={"steps": 2, **body}, headers=AUTH)
    assert response.status_code == 400 and match in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("route,body,match", [
    (POINTS, {"model": "tiny-points", "points": 0}, "whole number ≥ 1"),
    (POINTS, {"model": "tiny-points", "size": "64x64"}, "unknown field 'size'"),
    (POINTS, {"model": "tiny"}, "this is an image model: use POST /v1/images/generations"),
    (PATH, {"model": "tiny-points"}, "this is a points model: use POST /v1/points/generations"),
    (AUDIO, {"model": "tiny-points"}, "use POST /v1/points/generations"),
])
def test_bad_point_requests_get_400(server, route, body, match):
    response = server.post(route, json={"prompt": "a chair", **body}, headers=AUTH)
    assert response.status_code == 400 and match in response.json()["error"]["message"], response.text


def test_an_audio_model_on_the_image_route_gets_400(server):
    response = generate(server, model="tiny-audio")
    assert response.status_code == 400
    assert "this is an audio model: use POST /v1/audio/generations" in response.json()["error"]["message"]


def test_multiplexed_models_and_lora_adapters_are_chosen_by_the_model_field(server):
    a = generate(server, size="32x32", seed=3, model="tiny").json()["data"][0]["b64_json"]
    b = generate(server, size="32x32", seed=3, model="tiny-b").json()["data"][0]["b64_json"]
    lora = generate(server, size="32x32", seed=3, model="tiny-lora").json()["data"][0]["b64_json"]
    assert len({a, b, lora}) == 3
    assert generate(server, size="32x32", seed=3).json()["data"][0]["b64_json"] == a  # default model


def test_lora_ids_on_one_base_each_get_their_own_image_interleaved_concurrent_and_after_eviction(server):
    """The base and two LoRA ids of it share one loaded base in the replica, an adapter each (models/lora.py): requests
    to the three, interleaved and concurrent, each get the image they get alone; so do they after other models push
    them out of the replica's multiplex cache (4 models, least recently used first): one adapter, then the base."""
    ids = ["tiny", "tiny-lora", "tiny-lora-2"]

    def image(model: str) -> dict:
        response = generate(server, size="32x32", seed=11, model=model)
        assert response.status_code == 200, response.text
        return response.json()["data"][0]

    def use(model: str, route: str = PATH, **body) -> None:  # a request to ``model`` loads it on the replica
        response = server.post(route, json={"model": model, "steps": 1, **body}, headers=AUTH)
        assert response.status_code == 200, response.text

    alone = {model: image(model) for model in ids}
    assert len({alone[model]["b64_json"] for model in ids}) == 3
    calls = ids * 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for model, item in zip(calls, pool.map(image, calls)):
            assert_same_image_to_rounding(item, alone[model])
    others = [("tiny-b", PATH, {"prompt": "a red circle", "size": "32x32"}),
              ("tiny-class", PATH, {"prompt": "3", "size": "32x32"}),
              ("tiny-points", POINTS, {"prompt": "a sphere"}), ("tiny-points-label", POINTS, {"label": 0})]
    for model in ["tiny-lora", "tiny-lora-2", "tiny"]:  # in this order of use
        assert_same_image_to_rounding(image(model), alone[model])
    for model, route, body in others[:2]:  # whatever else the replica held goes, then tiny-lora: its adapter alone
        use(model, route, **body)
    for model in ["tiny-lora-2", "tiny", "tiny-lora"]:  # tiny-lora's adapter is loaded again on the shared base
        assert_same_image_to_rounding(image(model), alone[model])
    for model, route, body in others[2:] + others[:2]:  # all three go, and with them the base
        use(model, route, **body)
    for model in ids:
        assert_same_image_to_rounding(image(model), alone[model])


def test_a_replica_loads_one_base_for_its_lora_ids_and_unloads_what_no_loaded_id_uses(folders):
    """What the replica's multiplex cache holds (SamplerReplica._load, without Serve): the base and its LoRA ids share
    one model and text encoder; evicting a LoRA id (Serve calls the cached object's __del__) unloads its adapter
    only, and the base goes with the last id that uses it."""
    import torch

    from serve.app import SamplerReplica
    from serve.config import ServeConfig

    replica = SamplerReplica.func_or_class.__new__(SamplerReplica.func_or_class)  # the state _load needs, no Serve
    replica.config = from_dict(ServeConfig, serve_config(folders))
    replica.device, replica.dtype, replica._bases = "cpu", torch.float32, {}
    loaded = {name: replica._load(name) for name in ("tiny-lora", "tiny", "tiny-lora-2", "tiny-b")}
    shared = loaded["tiny"].sampler
    for name in ("tiny-lora", "tiny-lora-2"):
        assert loaded[name].sampler.model is shared.model and loaded[name].sampler.text_encoder is shared.text_encoder
    assert loaded["tiny-b"].sampler.model is not shared.model and len(replica._bases) == 2
    assert len(shared.adapters) == 2
    loaded.pop("tiny-lora").__del__()  # evicted: its adapter goes, the base stays for the other two
    assert len(shared.adapters) == 1 and "tiny-lora-2" in shared.adapters and len(replica._bases) == 2
    loaded.pop("tiny").__del__()
    assert len(shared.adapters) == 1 and len(replica._bases) == 2
    loaded.pop("tiny-lora-2").__del__()  # the last id of the base: the base goes too
    assert len(shared.adapters) == 0 and len(replica._bases) == 1
    assert not any("lora" in name for name, _ in shared.model.named_modules())


def test_class_conditional_model_takes_a_class_index_or_name_as_prompt(server):
    by_index = generate(server, prompt="3", size="32x32", seed=3, model="tiny-class")
    assert by_index.status_code == 200, by_index.text
    by_name = generate(server, prompt="Shape 3", size="32x32", seed=3, model="tiny-class")
    assert by_name.json()["data"][0]["b64_json"] == by_index.json()["data"][0]["b64_json"]
    for prompt, match in (("a red circle", "neither a class index"), ("10", "outside [0, 10)")):
        bad = generate(server, prompt=prompt, size="32x32", model="tiny-class")
        assert bad.status_code == 400 and match in bad.json()["error"]["message"], bad.text


def test_requests_without_a_valid_token_get_401(server):
    body = {"prompt": "x"}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}]:
        response = server.post(PATH, json=body, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert server.get("/v1/models").status_code == 401
    # auth comes first: an unauthenticated malformed request learns nothing about validation
    assert server.post(PATH, content=b"{not json", headers={"content-type": "application/json"}).status_code == 401


MALFORMED = [
    ("unknown field", {"prompt": "x", "temperature": 1}, 400),
    ("typo of a field", {"prompt": "x", "guidance": 3}, 400),
    ("missing prompt", {"size": "32x32"}, 400),
    ("prompt not a string", {"prompt": 5}, 400),
    ("empty prompt", {"prompt": ""}, 400),
    ("blank prompt", {"prompt": "   "}, 400),
    ("prompt above the token limit", {"prompt": "word " * 200}, 400),
    ("size not WxH", {"prompt": "x", "size": "large"}, 400),
    ("size with one side", {"prompt": "x", "size": "64"}, 400),
    ("size not a multiple of 16", {"prompt": "x", "size": "50x32"}, 400),
    ("size of zero", {"prompt": "x", "size": "0x32"}, 400),
    ("size above the side limit", {"prompt": "x", "size": "256x16"}, 400),
    ("size above the pixel limit", {"prompt": "x", "size": "128x128"}, 400),
    ("negative size", {"prompt": "x", "size": "-32x32"}, 400),
    ("size of full-width digits", {"prompt": "x", "size": "６４x６４"}, 400),
    ("size of Arabic-Indic digits", {"prompt": "x", "size": "٦٤x٣٢"}, 400),
    ("n of zero", {"prompt": "x", "n": 0}, 400),
    ("n above the limit", {"prompt": "x", "n": 3}, 400),
    ("n not an integer", {"prompt": "x", "n": 1.5}, 400),
    ("steps of zero", {"prompt": "x", "steps": 0}, 400),
    ("steps above the limit", {"prompt": "x", "steps": 50}, 400),
    ("unknown solver", {"prompt": "x", "solver": "ddim"}, 400),
    ("unknown schedule", {"prompt": "x", "schedule": "karras"}, 400),
    ("unknown rope mode", {"prompt": "x", "rope_scaling": "yarn"}, 400),
    ("negative guidance", {"prompt": "x", "guidance_scale": -1}, 400),
    ("guidance above the limit", {"prompt": "x", "guidance_scale": 1000}, 400),
    ("guidance just above the limit", {"prompt": "x", "guidance_scale": 30.5}, 400),
    ("prompt above the character limit", {"prompt": "x" * 8001}, 400),
    ("negative seed", {"prompt": "x", "seed": -1}, 400),
    ("seed too large", {"prompt": "x", "seed": 2**70}, 400),
    ("url response format", {"prompt": "x", "response_format": "url"}, 400),
    ("context_drop not a bool", {"prompt": "x", "context_drop": "sometimes"}, 400),
    ("body is a list", ["x"], 400),
    ("body is a string", "a prompt", 400),
    ("unknown model", {"prompt": "x", "model": "gpt-image-1"}, 404),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_the_right_4xx(server, case):
    _, body, status = case
    response = server.post(PATH, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_malformed_json_and_wrong_content_type(server):
    bad_json = server.post(PATH, content=b'{"prompt": "x",', headers={**AUTH, "content-type": "application/json"})
    assert bad_json.status_code == 400 and "malformed JSON" in bad_json.json()["error"]["message"]
    # every parse failure is a JSON 400: nesting deeper than the interpreter's stack, an integer of more than 4300
    # digits (both raise outside JSONDecodeError), bytes that are not UTF-8
    for route in (PATH, AUDIO, POINTS):
        for content in (b"[" * 1000, b'{"prompt": ' + b"[" * 100_000, b'{"prompt": "x", "n": ' + b"1" * 5000 + b"}",
                        b'{"prompt": "\xff\xfe"}'):
            response = server.post(route, content=content, headers={**AUTH, "content-type": "application/json"})
            assert response.status_code == 400, (route, content[:20], response.text[:200])
            assert response.json()["error"]["code"] == "invalid_json"
    # nesting that parses reaches the schema, which refuses it
    nested = b'{"prompt": "x", "user": ' + b"[" * 500 + b"]" * 500 + b"}"
    response = server.post(PATH, content=nested, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "user", response.text[:200]
    form = server.post(PATH, data={"prompt": "x"}, headers=AUTH)
    assert form.status_code == 415
    text = server.post(PATH, content=b"prompt=x", headers={**AUTH, "content-type": "text/plain"})
    assert text.status_code == 415


def test_seeds_of_an_n_batch_stay_within_the_accepted_range(server):
    """Output i of n gets seed + i, so a base seed whose batch would pass the largest seed is refused on every route
    (docs/architecture.md#http-api); every seed the API reports can be sent back."""
    from serve.schema import MAX_SEED

    pair = generate(server, size="32x32", seed=MAX_SEED - 1, n=2)
    assert pair.status_code == 200, pair.text
    assert [d["seed"] for d in pair.json()["data"]] == [MAX_SEED - 1, MAX_SEED]
    again = generate(server, size="32x32", seed=MAX_SEED)
    assert again.status_code == 200 and again.json()["data"][0]["seed"] == MAX_SEED, again.text
    assert_same_image_to_rounding(again.json()["data"][0], pair.json()["data"][1])
    for route, model in ((PATH, "tiny"), (AUDIO, "tiny-audio"), (POINTS, "tiny-points")):
        response = server.post(route, json={"prompt": "x", "model": model, "seed": MAX_SEED, "n": 2}, headers=AUTH)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "seed" and error["code"] == "seed_out_of_range", error
        assert f"use a seed ≤ {MAX_SEED - 1}" in error["message"]


def test_schemathesis_finds_no_server_error(server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.base_url}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "15", "--header", f"Authorization: Bearer {TOKEN}",
         "--phases", "examples,coverage,fuzzing", "--seed", "1", "--request-timeout", "60", "--workers", "1",
         "--suppress-health-check", "all", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_overload_gets_503_with_retry_after_and_nothing_hangs(server, folders):
    """A second app whose sampler takes one request at a time and queues one: a burst gets 503s, the rest 200s."""
    from ray import serve

    config = to_dict(serve_config(folders, batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0}))
    start_app(config, "tight", "/tight", {"max_ongoing_requests": 1, "max_queued_requests": 1})
    try:
        url = f"{PATH.replace('/v1', '/tight/v1')}"
        body = {"prompt": "a blue square", "size": "64x64", "steps": 4, "solver": "rk4"}

        def call(seed):
            started = time.time()
            response = server.post(url, json={**body, "seed": seed}, headers=AUTH, timeout=120)
            return response.status_code, response.headers.get("retry-after"), time.time() - started

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(call, range(10)))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        assert all(r[1] is not None for r in results if r[0] == 503)
        assert max(r[2] for r in results) < 110
    finally:
        serve.delete("tight")


def test_an_overrunning_solve_is_stopped_and_an_over_budget_request_refused_up_front(server, folders):
    """A second app with a 4-s request budget. Cold (nothing measured yet), a request of 10 000 rk4 steps is answered
    504 at the budget and its solve stops at the replica's deadline, so a small request right after is served at once
    (uncancelled, the big solve would hold the replica for tens of seconds more). Once the replica has measured a
    solve, the same big request is refused up front with a 400 that names the budget, and small ones still run."""
    from ray import serve

    config = to_dict(serve_config({"tiny": folders["tiny"]}, request_timeout_s=4.0,
                                  limits={"max_n": 2, "max_steps": 10_000, "max_prompt_tokens": 24},
                                  batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0}))
    start_app(config, "budget", "/budget")
    try:
        url = PATH.replace("/v1", "/budget/v1")
        big = {"prompt": "a red cat", "size": "128x96", "steps": 10_000, "solver": "rk4", "seed": 1}
        small = {"prompt": "a red cat", "size": "64x64", "steps": 2, "seed": 2}

        def timed(body):
            started = time.time()
            response = server.post(url, json=body, headers=AUTH, timeout=120)
            return response, time.time() - started

        late, _ = timed(big)
        assert assert_json_error(late, 504)["type"] == "timeout"
        served, seconds = timed(small)
        assert served.status_code == 200 and seconds < 20, (served.status_code, seconds)
        refused, seconds = timed(big)
        message = assert_json_error(refused, 400)["message"]
        assert "over the 4 s request budget" in message and seconds < 5, (message, seconds)
        assert timed(small)[0].status_code == 200
    finally:
        serve.delete("budget")


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status and response.headers["content-type"] == "application/json", (
        response.status_code, response.headers.get("content-type"), response.text[:300])
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    return error


def test_an_unhandled_exception_in_a_route_is_a_json_500():
    """The Ingress's FastAPI app answers whatever a route did not handle with the error shape, never text/plain (checked
    here on a route of its own; the Serve replica keeps the response when Starlette raises the exception again)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve.app import api, internal_error

    assert api.exception_handlers[Exception] is internal_error
    app = FastAPI()
    app.add_exception_handler(Exception, internal_error)

    @app.get("/boom")
    async def boom():
        raise KeyError("a bug")

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    error = assert_json_error(response, 500)
    assert error["code"] == "internal_error" and "a bug" not in response.text


def test_readiness_is_503_while_the_sampler_replica_cannot_load(server, folders, tmp_path):
    """A model folder whose weights do not load: the Ingress is up (liveness 200), the sampler replica's constructor
    fails (Serve retries it, then marks the deployment failed); readiness is a JSON 503, a generation a JSON 503 or 504.
    The one test with an app of its own (about 15 s, most of it the Ingress actor's start)."""
    import shutil

    from ray import serve

    from serve.app import Ingress, SamplerReplica

    broken = tmp_path / "broken"
    shutil.copytree(folders["tiny"]["path"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = to_dict(serve_config({"broken": {"path": str(broken)}}, request_timeout_s=1.5, ready_timeout_s=1.0))
    app = Ingress.bind(SamplerReplica.options(num_replicas=1).bind(config), config)
    serve.run_many([serve.RunTarget(app, name="broken", route_prefix="/broken")], wait_for_applications_running=False)
    try:
        deadline = time.time() + 60
        while server.get("/broken/healthz").status_code != 200:  # the proxy answers 404 until the Ingress is up
            assert time.time() < deadline, "the broken app's Ingress did not start"
            time.sleep(0.5)
        ready = server.get("/broken/readyz")  # while Serve retries the replica's constructor
        error = assert_json_error(ready, 503)
        assert error["code"] == "not_ready" and "'broken'" in error["message"] and ready.headers["retry-after"] == "2"
        generation = server.post("/broken" + PATH, json={"prompt": "x", "size": "32x32"}, headers=AUTH)
        assert generation.status_code in (503, 504), generation.text  # refused, or queued for a replica until timeout
        assert_json_error(generation, generation.status_code)
        assert server.get("/broken/healthz").json() == {"status": "ok"}  # liveness stays cheap: no sampler involved
    finally:
        serve.delete("broken")


def sampler_replicas(app: str = "lumina") -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and app in a["name"] and "SamplerReplica" in a["name"]}


def test_killed_replica_gives_json_503s_in_flight_and_is_replaced(server):
    """kill -9 of the sampler replica with requests in flight: each gets a JSON 503 with Retry-After (or its 200, had it
    finished); during the recovery readiness is a JSON 503 and generations JSON; then Serve's replacement serves."""
    import threading

    import ray

    before = sampler_replicas()
    assert len(before) == 1
    body = {"prompt": "a slow red circle", "size": "96x128", "steps": 4, "solver": "rk4", "n": 2}
    stop, responses = threading.Event(), []

    def client():  # back to back, so a request is in flight when the replica dies
        with httpx.Client(base_url=server.base_url, timeout=120) as own:
            while not stop.is_set():
                responses.append(own.post(PATH, json=body, headers=AUTH))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 60
    while len(responses) < 3:  # every client is generating
        assert time.time() < deadline
        time.sleep(0.05)
    served = len(responses)
    time.sleep(0.3)
    readiness = []

    def probe():  # from the kill on, until the replacement is ready: the recovery window seen from /readyz
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            deadline = time.time() + 120
            while time.time() < deadline:
                readiness.append(own.get("/readyz"))
                statuses = [r.status_code for r in readiness]
                if 503 in statuses and statuses[-1] == 200:  # a 200 just after the kill may be the dying replica's
                    return
                time.sleep(0.05)

    ray.kill(ray.get_actor(next(iter(before)), namespace="serve"), no_restart=False)
    prober = threading.Thread(target=probe)
    prober.start()
    stop.set()
    for thread in [*threads, prober]:
        thread.join(timeout=120)
    for response in responses:
        assert response.status_code in (200, 503), (response.status_code, response.text[:300])
        assert response.headers["content-type"] == "application/json", response.text[:300]
    in_flight = [r for r in responses[served:] if r.status_code == 503]
    assert in_flight, [r.status_code for r in responses]
    for response in in_flight:
        assert assert_json_error(response, 503)["code"] == "replica_unavailable"
        assert response.headers["retry-after"] == "2"
    for ready in readiness:  # the replica is gone and its replacement loads the model: not ready, as JSON
        assert ready.status_code in (200, 503) and ready.headers["content-type"] == "application/json", ready.text
    not_ready = [r for r in readiness if r.status_code == 503]
    assert not_ready, [r.status_code for r in readiness]
    assert assert_json_error(not_ready[0], 503)["code"] == "not_ready"
    deadline = time.time() + 120
    while time.time() < deadline:
        ready = server.get("/readyz")
        assert ready.status_code in (200, 503) and ready.headers["content-type"] == "application/json", ready.text
        if ready.status_code == 200:
            response = generate(server, size="32x32", seed=1)
            assert response.status_code in (200, 503) and response.headers["content-type"] == "application/json"
            if response.status_code == 200:
                break
        time.sleep(0.5)
    else:
        pytest.fail("the killed sampler replica was not replaced in time")
    assert sampler_replicas() - before  # Serve's replacement, not the old actor
    assert response.json()["data"][0]["seed"] == 1
