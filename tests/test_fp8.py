"""FP8 inference (models/fp8.py): the e4m3 rowwise matmul is the dequantised product, a quantized Next-DiT stays close
to the full-precision one, and the Sampler runs it. Numerics are checked on the CPU (torch._scaled_mm runs there);
speed is a benchmark's business (`python -m jobs.bench model --fp8`)."""

from __future__ import annotations

import pytest
import torch

from models import NextDiTConfig
from models.fp8 import E4M3_MAX, Float8Linear, quantize_fp8, quantize_rowwise
from tests.helpers import caption_batch, random_nextdit

CFG = NextDiTConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, cap_feat_dim=48, train_grid=(1, 8, 8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the activations of a bf16 model
def test_rowwise_quantization_uses_the_full_range_per_row(dtype):
    x = (torch.randn(6, 32) * torch.logspace(-3, 3, 6)[:, None]).to(dtype)  # rows of very different magnitudes
    q, scale = quantize_rowwise(x)
    assert scale.dtype == torch.float32
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.allclose(q.float().abs().amax(-1), torch.full((6,), E4M3_MAX))
    assert rel_err(q.float() * scale, x) < 0.05  # 3 mantissa bits: a few per cent per element at most


def test_float8_linear_is_the_dequantised_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(3, 5, 64)
    fp8 = Float8Linear.from_linear(linear)
    qx, sx = quantize_rowwise(x.reshape(-1, 64))
    dequantised = (qx.float() * sx) @ (fp8.weight.float() * fp8.weight_scale.reshape(-1, 1)).t()
    out = fp8(x)
    assert out.shape == (3, 5, 96) and out.dtype == x.dtype
    assert rel_err(out.reshape(-1, 96), dequantised) < 5e-3  # fp32 accumulation, bf16 result
    assert rel_err(out, linear(x)) < 0.06
    with pytest.raises(ValueError, match="bias-free"):
        Float8Linear.from_linear(torch.nn.Linear(64, 96))


def test_quantized_nextdit_stays_close_to_full_precision():
    model = random_nextdit(CFG)
    x, t = torch.randn(2, 4, 16, 12), torch.rand(2)
    feats, mask = caption_batch(2, 9, CFG.cap_feat_dim, valid=[9, 4])
    want = model(x, t, feats, mask)
    assert quantize_fp8(model) == 9 * CFG.n_layers  # q k v o, caption k v, w1 w2 w3 of every block
    assert isinstance(model.layers[0].feed_forward.w2, Float8Linear)
    assert not isinstance(model.layers[0].adaLN_modulation[1], Float8Linear)  # modulation stays full precision
    assert rel_err(model(x, t, feats, mask), want) < 0.08
    assert quantize_fp8(model) == 0  # idempotent


def test_quantize_refuses_a_training_model_and_skips_unaligned_sizes():
    with pytest.raises(ValueError, match="eval"):
        quantize_fp8(random_nextdit(CFG).train())
    odd = random_nextdit(NextDiTConfig(dim=72, n_layers=1, n_heads=3, n_kv_heads=3, multiple_of=8, cap_feat_dim=24,
                                       train_grid=(1, 4, 4)))
    assert quantize_fp8(odd) == 0  # 72 and 24 are not multiples of 16: left in full precision


def test_sampler_with_fp8_projections(tmp_path):
    from models.sampler import GenerationRequest, Sampler
    from tests.tiny_models import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

    folder = make_tiny_model_folder(tmp_path / "model", make_tiny_text_encoder(tmp_path / "te"),
                                    make_tiny_vae(tmp_path / "vae"), sampler={"steps": 2})
    request = GenerationRequest("a red cat", width=64, height=64, seed=3)
    (full,) = Sampler.from_pretrained(folder).generate([request])
    sampler = Sampler.from_pretrained(folder, config={"fp8": True})
    assert any(isinstance(m, Float8Linear) for m in sampler.model.modules())
    (fp8,) = sampler.generate([request])
    assert fp8.image.shape == (64, 64, 3) and fp8.metadata["fp8"] is True and "fp8" not in full.metadata
    assert rel_err(fp8.latent, full.latent) < 0.05  # same seed: the same image up to FP8 rounding
