"""CUDA paths (marked ``gpu``: skipped without CUDA, run by scripts/gpu_bench.sh on a lent GPU).

bf16 tolerances follow the device method's rule of thumb: bf16 operands land between 1e-3 and 1e-2 relative error
against an fp32 reference; fp32 on the GPU (TF32 off) must agree with the CPU to ~1e-5.
"""

from __future__ import annotations

import pytest
import torch

from models import NextDiTConfig
from models.attention import attention
from tests.helpers import caption_batch, random_nextdit

pytestmark = pytest.mark.gpu

CFG = NextDiTConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, cap_feat_dim=48, train_grid=(1, 8, 8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def inputs(batch=2, h=16, w=12, device="cuda"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, h, w, generator=gen)
    t = torch.rand(batch, generator=gen)
    feats, mask = caption_batch(batch, 9, CFG.cap_feat_dim, valid=[9, 4])
    return [v.to(device) for v in (x, t, feats, mask)]


def test_fp32_cuda_matches_cpu():
    model = random_nextdit(CFG)
    cpu = model(*inputs(device="cpu"))
    gpu = model.cuda()(*inputs())
    assert rel_err(gpu.cpu(), cpu) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_bf16_backends_match_the_fp32_reference(backend):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    reference = random_nextdit(CFG).cuda()
    want = reference(*inputs())
    model = random_nextdit(NextDiTConfig(**{**CFG.__dict__, "attention_backend": backend})).cuda().to(torch.bfloat16)
    x, t, feats, mask = inputs()
    got = model(x.bfloat16(), t, feats.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2


def test_padded_list_batch_equals_samples_alone_on_cuda():
    model = random_nextdit(CFG).cuda()
    x, t, feats, mask = inputs()
    small = torch.randn(4, 8, 8, device="cuda")
    both = model([x[0], small], t, feats, mask)
    for i, sample in enumerate([x[0], small]):
        alone = model([sample], t[i:i + 1], feats[i:i + 1, : int(mask[i].sum())], mask[i:i + 1, : int(mask[i].sum())])
        assert rel_err(both[i], alone[0]) < 1e-5


@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 2)])
def test_sdpa_attention_matches_math_with_padding_and_gqa(heads, kv):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, heads, 64, generator=gen).cuda().bfloat16()
    k = torch.randn(2, 37, kv, 64, generator=gen).cuda().bfloat16()
    v = torch.randn(2, 37, kv, 64, generator=gen).cuda().bfloat16()
    mask = torch.ones(2, 37, dtype=torch.bool, device="cuda")
    mask[1, 20:] = False
    scale = torch.tensor([0.1, 0.2], device="cuda")  # proportional attention: a scale per sample
    assert rel_err(attention(q, k, v, mask, scale, "sdpa"), attention(q, k, v, mask, scale, "math")) < 1e-2


def test_training_step_under_bf16_autocast_gives_finite_gradients():
    from models.flow import flow_matching_loss

    model = random_nextdit(CFG).cuda().train()
    model.set_activation_checkpointing(True)
    x, t, feats, mask = inputs()
    with torch.autocast("cuda", torch.bfloat16):
        loss, _ = flow_matching_loss(model, x, feats, mask, t=t, noise=torch.randn_like(x))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if name != "pad_token"}  # no list batch: unused
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_fp8_projections_on_cuda_are_the_dequantised_product_and_keep_the_model_close():
    from models.fp8 import Float8Linear, fp8_supported, quantize_fp8, quantize_rowwise

    if not fp8_supported("cuda"):
        pytest.skip("FP8 matmuls need compute capability ≥ 8.9")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=False).cuda()
    x = torch.randn(3, 37, 256, device="cuda", dtype=torch.bfloat16)  # 111 rows: not a multiple of 16
    fp8 = Float8Linear.from_linear(linear)
    qx, sx = quantize_rowwise(x.reshape(-1, 256))
    dequantised = (qx.float() * sx) @ (fp8.weight.float() * fp8.weight_scale.reshape(-1, 1)).t()
    out = fp8(x)
    assert out.shape == (3, 37, 384) and out.dtype == torch.bfloat16
    assert rel_err(out.reshape(-1, 384), dequantised) < 5e-3
    model = random_nextdit(CFG).cuda().to(torch.bfloat16).eval()
    x, t, feats, mask = inputs()
    with torch.no_grad():
        want = model(x.bfloat16(), t, feats.bfloat16(), mask)
        assert quantize_fp8(model) == 9 * CFG.n_layers
        assert rel_err(model(x.bfloat16(), t, feats.bfloat16(), mask), want) < 0.08
