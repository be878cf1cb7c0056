"""LoRA adapters held unmerged on one shared base (models/lora.py): the same outputs as merged copies, one copy of the
base weights, solves that take turns, and a clear error for an adapter that does not fit."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch

from models import preset
from models.lora import LoraAdapters, merge_adapter
from models.sampler import GenerationRequest, Sampler
from models.tiny import make_lora_adapter, random_nextdit
from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

TINY = preset("tiny")


def base() -> torch.nn.Module:
    return random_nextdit(TINY, seed=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters on the tiny base with other targets and weights each."""
    root = tmp_path_factory.mktemp("lora")
    return (make_lora_adapter(base(), root / "a", seed=1, target_modules=("wq", "w2")),
            make_lora_adapter(base(), root / "b", seed=2, target_modules=("wk", "wv", "w1", "w3"), rank=2, alpha=4))


def forward(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, TINY.in_channels, 16, 16, generator=gen)
    feats = torch.randn(2, 5, TINY.cap_feat_dim, generator=gen)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.inference_mode():
        return model(x, torch.tensor([0.3, 0.8]), feats, mask)


def test_adapters_on_one_base_give_what_their_merged_models_give(adapters):
    a, b = adapters
    expected = {None: forward(base()), a: forward(merge_adapter(base(), a)), b: forward(merge_adapter(base(), b))}
    assert not torch.allclose(expected[a], expected[None]) and not torch.allclose(expected[b], expected[None])
    model = base()
    weights = {p.data_ptr() for p in model.parameters()}
    shared = LoraAdapters(model)
    shared.load("a", a)
    shared.load("b", b)
    # the base weights are the same tensors, one copy; only the adapters' small matrices were added
    base_params = [p for name, p in model.named_parameters() if "lora_" not in name]
    assert {p.data_ptr() for p in base_params} == weights and len(base_params) == len(weights)
    lora_bytes = sum(p.nbytes for name, p in model.named_parameters() if "lora_" in name)
    assert 0 < lora_bytes < 0.2 * sum(p.nbytes for p in base_params)
    first = {}
    for name, folder in [("a", a), ("b", b), (None, None), ("a", a), (None, None), ("b", b)]:  # back and forth
        with shared.active(name) as active:
            assert active is model
            out = forward(active)
        torch.testing.assert_close(out, expected[folder], rtol=1e-5, atol=1e-6)  # not bitwise: merged rounds otherwise
        assert torch.equal(out, first.setdefault(name, out))  # switching back gives the very same result
    shared.delete("a")
    with shared.active("b") as active:
        torch.testing.assert_close(forward(active), expected[b], rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="no LoRA adapter named 'a'"), shared.active("a"):
        pass
    shared.delete("b")  # the last one: the model gets its plain layers back
    assert not any("lora" in name for name, _ in model.named_modules())
    assert torch.equal(forward(model), expected[None])


def test_an_adapter_that_does_not_fit_is_a_clear_error_naming_its_folder(adapters, tmp_path):
    a, _ = adapters
    other_base = make_lora_adapter(random_nextdit(preset("small")), tmp_path / "small")  # other widths
    deeper = make_lora_adapter(random_nextdit(preset("tiny", n_layers=3)), tmp_path / "deeper")  # a layer more
    no_targets = make_lora_adapter(base(), tmp_path / "no-targets")
    config_file = tmp_path / "no-targets" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), target_modules=["to_q", "to_k"])))
    model = base()
    shared = LoraAdapters(model)
    with pytest.raises(ValueError, match="does not fit"):  # as the first adapter: peft's wrapping is undone too
        shared.load("bad", other_base)
    assert len(shared) == 0 and not any("lora" in name for name, _ in model.named_modules())
    shared.load("a", a)
    with shared.active("a") as active:
        before = forward(active)
    for folder, match in [(other_base, "size mismatch"), (deeper, "weights for modules this base lacks"),
                          (no_targets, "to_k")]:
        with pytest.raises(ValueError, match=f"LoRA adapter '{folder}' does not fit this base model.*{match}"):
            shared.load("bad", folder)
        with pytest.raises(ValueError, match=f"'{folder}' does not fit"):  # merging checks the same
            merge_adapter(base(), folder)
    with pytest.raises(FileNotFoundError, match=f"cannot load a LoRA adapter from '{tmp_path / 'missing'}'"):
        shared.load("bad", str(tmp_path / "missing"))
    assert len(shared) == 1 and "bad" not in shared  # nothing of the failed loads is left on the base
    with shared.active("a") as active:
        assert torch.equal(forward(active), before)
    shared.delete("a")
    assert not any("lora" in name for name, _ in model.named_modules())


def test_samplers_of_one_base_share_it_and_take_turns(adapters, tmp_path):
    """Samplers made by ``load_adapter`` share every module; run from several threads at once, each solve still uses
    its own adapter (the shared model's adapter is held for the whole solve), and equals the merged model's."""
    a, b = adapters
    folder = make_tiny_model_folder(tmp_path / "model", make_tiny_text_encoder(tmp_path / "te"),
                                    make_tiny_vae(tmp_path / "vae"), model=base(), sampler={"steps": 2})
    plain = Sampler.from_pretrained(folder)
    requests = [GenerationRequest("a red cat", width=32, height=32, seed=3)]
    alone = {None: plain.generate(requests)[0].latent}
    for folder_ in (a, b):
        merged = Sampler.from_pretrained(folder, adapter=folder_)  # the default: merged into the weights
        assert not any("lora" in name for name, _ in merged.model.named_modules())
        alone[folder_] = merged.generate(requests)[0].latent
    with_a, with_b = plain.load_adapter("a", a), plain.load_adapter("b", b)
    for sampler in (with_a, with_b):
        assert sampler.model is plain.model and sampler.text_encoder is plain.text_encoder
        assert sampler.vae is plain.vae and sampler.adapters is plain.adapters
    runs = [(plain, None), (with_a, a), (with_b, b)] * 3
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        latents = list(pool.map(lambda run: run[0].generate(requests)[0].latent, runs))
    for (_, folder_), latent in zip(runs, latents):
        torch.testing.assert_close(latent, alone[folder_], rtol=1e-4, atol=1e-5)
    unmerged = Sampler.from_pretrained(folder, adapter=a, merge_adapter=False)
    assert unmerged.adapter == a and any("lora" in name for name, _ in unmerged.model.named_modules())
    torch.testing.assert_close(unmerged.generate(requests)[0].latent, alone[a], rtol=1e-4, atol=1e-5)
