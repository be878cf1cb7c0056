"""``python -m jobs.bench audio``: the real-time factor of text-to-audio through our ``Sampler`` — seconds of audio
generated per second of wall time for a fixed duration, steps and batch, with text encoding, the ODE solve with CFG,
the mel-VAE decode and the vocoder (Griffin-Lim) timed, and the time split per stage — and one sampler step of our
Next-DiT on (C, 1, T) latent frames against a plain-PyTorch reference step, in one run.

There is no diffusers peer for an audio Next-DiT, so the step's anchor is ``ReferenceNextDiT1D`` below: a compact,
straightforward PyTorch implementation of the same block math (1D RoPE, sandwich RMSNorm, tanh-gated scale-only adaLN,
QK-norm, GQA, gated cross-attention, proportional attention, SDPA), holding the same weights read from our model's
state dict. Its output is checked against ours (allclose, in fp32) before anything is timed, so the ratio compares
equal work. A step is one Euler step: one CFG-pair forward (batch 2·B) plus the guidance combination, through the same
``velocity_fn`` for both.

CPU (CI-sized, the defaults there): preset ``tiny-audio``, the tiny random Gemma and mel VAE of ``models/tiny.py``,
fp32.
GPU: ``python -m jobs.bench audio --device cuda`` — preset ``audio`` (the official audio model's width and depth), a
FLAN-T5-large-shaped encoder and the paper-sized mel VAE (random weights, built on the device), bf16 transformer.
Griffin-Lim runs on the CPU in either case (``models.audio.decode_audio``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time

import torch
import torch.nn.functional as F

from jobs.benchmarks import bench_parser
from jobs.benchmarks.model import timed_pair

# The components' shapes on a GPU (the official audio / music model's FLAN-T5-large captions, the paper's mel VAE)
# and their CPU-sized stand-ins (models/tiny.py).
T5_LARGE = dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, feed_forward_proj="gated-gelu")
TEXT_ENCODERS = ("tiny", "t5-large")
VAES = ("tiny", "paper")
PROMPTS = ("a low tone", "a high tone", "a middle tone", "a bright tone", "a dark tone", "a pitched tone",
           "a big tone", "a small tone")
MATCH_TOL = 1e-4  # fp32: ours and the reference differ by summation order only


# ---------------------------------------------------------------------------------------------------------------------
class ReferenceNextDiT1D:
    """Next-DiT on audio latents (B, C, 1, T), written out plainly over a state dict (patch 1, text conditioning).

    Per block (same names as ours, docs/official-formats.md#architecture-constants)::

        s_msa, g_msa, s_mlp, g_mlp = Linear(SiLU(c))
        a = Attn(RMSNorm(x)·(1 + s_msa));   x = x + tanh(g_msa)·RMSNorm(a)
        f = FFN(RMSNorm(x)·(1 + s_mlp));    x = x + tanh(g_mlp)·RMSNorm(f)

    Attn: q, k = LayerNorm(W x) (QK-norm), v = W x; 1D RoPE over frame index on q, k; self-attention with the
    proportional scale sqrt(log_{N_base} N / d); cross-attention of the same rotated q to LayerNorm(W_k y), W_v y of
    the RMS-normed caption, added per head through tanh(gate); then W_o. K/V heads are grouped (SDPA ``enable_gqa``).
    """

    def __init__(self, cfg, state: dict[str, torch.Tensor]):
        if cfg.modality != "audio" or cfg.conditioning != "text" or cfg.patch_size != 1:
            raise ValueError("the reference covers text-conditioned audio Next-DiTs with patch 1")
        self.cfg = cfg
        self.w = {k: v.detach().clone() for k, v in state.items()}

    @property
    def dtype(self) -> torch.dtype:  # what velocity_fn casts the inputs to
        return self.w["x_embedder.weight"].dtype

    def to(self, device=None, dtype=None) -> ReferenceNextDiT1D:
        self.w = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.w.items()}
        return self

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def _rms(self, name: str, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.norm_eps).to(x.dtype)
        return normed * self.w[f"{name}.weight"]

    def _ln(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"], 1e-5)

    def _rope(self, n: int, device) -> torch.Tensor:
        """e^{i·pos·ω_k}, ω_k = θ^(−2k/d), k < d/2: every pair rotates with the frame index (axes (0, 0, d))."""
        hd = self.cfg.head_dim
        freqs = (self.cfg.rope_theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)).float()
        angles = torch.arange(n, dtype=torch.float32, device=device)[:, None] * freqs.to(device)[None]
        return torch.polar(torch.ones_like(angles), angles)  # (N, d/2)

    @staticmethod
    def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:  # x (B, N, H, d): pairs (2j, 2j+1)
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rotation[None, :, None, :]).flatten(-2).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cap_feats: torch.Tensor, cap_mask: torch.Tensor):
        cfg, w = self.cfg, self.w
        batch, channels, _, frames = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        h = self._linear("x_embedder", x[:, :, 0].transpose(1, 2))  # (B, T, D): one token per latent frame
        # condition: sinusoidal t (cos, sin) → MLP, plus the masked-mean caption through LayerNorm → Linear
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        c = self._linear("t_embedder.mlp.2", F.silu(self._linear("t_embedder.mlp.0",
                                                                 torch.cat([args.cos(), args.sin()], -1).to(h.dtype))))
        weights = cap_mask.float()[..., None]
        pooled = ((cap_feats * weights).sum(1) / weights.sum(1)).to(cap_feats.dtype)
        c = c + self._linear("cap_embedder.1", self._ln("cap_embedder.0", pooled))
        y_mask = None if bool(cap_mask.all()) else cap_mask[:, None, None, :]
        rotation = self._rope(frames, x.device)
        scale = math.sqrt(math.log(frames, cfg.base_tokens) / hd) if cfg.proportional_attn and frames > 1 else None
        gqa = nh != nkv
        for i in range(cfg.n_layers):
            p = f"layers.{i}"
            s_msa, g_msa, s_mlp, g_mlp = self._linear(f"{p}.adaLN_modulation.1", F.silu(c))[:, None].chunk(4, -1)
            y = self._rms(f"{p}.attention_y_norm", cap_feats)
            a = self._rms(f"{p}.attention_norm1", h) * (1 + s_msa)
            q = self._ln(f"{p}.attention.q_norm", self._linear(f"{p}.attention.wq", a)).view(batch, frames, nh, hd)
            k = self._ln(f"{p}.attention.k_norm", self._linear(f"{p}.attention.wk", a)).view(batch, frames, nkv, hd)
            v = self._linear(f"{p}.attention.wv", a).view(batch, frames, nkv, hd)
            q, k = self._rotate(q, rotation).transpose(1, 2), self._rotate(k, rotation).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), scale=scale, enable_gqa=gqa)
            ky = self._ln(f"{p}.attention.ky_norm", self._linear(f"{p}.attention.wk_y", y))
            vy = self._linear(f"{p}.attention.wv_y", y)
            ky, vy = (z.view(batch, -1, nkv, hd).transpose(1, 2) for z in (ky, vy))
            cross = F.scaled_dot_product_attention(q, ky, vy, attn_mask=y_mask, enable_gqa=gqa)
            out = out + torch.tanh(w[f"{p}.attention.gate"]).view(1, -1, 1, 1).to(out.dtype) * cross
            attn = self._linear(f"{p}.attention.wo", out.transpose(1, 2).flatten(2))
            h = h + torch.tanh(g_msa) * self._rms(f"{p}.attention_norm2", attn)
            f = self._rms(f"{p}.ffn_norm1", h) * (1 + s_mlp)
            f = self._linear(f"{p}.feed_forward.w2", F.silu(self._linear(f"{p}.feed_forward.w1", f))
                             * self._linear(f"{p}.feed_forward.w3", f))
            h = h + torch.tanh(g_mlp) * self._rms(f"{p}.ffn_norm2", f)
        modulation = self._linear("final_layer.adaLN_modulation.1", F.silu(c))[:, None]
        out = self._linear("final_layer.linear", F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + modulation))
        return out[..., :channels].transpose(1, 2)[:, :, None]  # (B, C, 1, T)


# ---------------------------------------------------------------------------------------------------------------------
def build_text_encoder(name: str, device: torch.device, dtype: torch.dtype):
    """``tiny``: models/tiny.py's random Gemma (saved and loaded back as jobs do); ``t5-large``: a FLAN-T5-large-shaped
    random T5 encoder built on the device (a small word-level vocabulary: only the embedding table differs)."""
    from models.text_encoder import TextEncoder
    from models.tiny import make_tiny_text_encoder, vocabulary, word_level_tokenizer

    if name == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            return TextEncoder.from_pretrained(make_tiny_text_encoder(folder), device=device, dtype=dtype)
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab = word_level_tokenizer(vocabulary(), "t5")
    config = T5Config(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"],
                      decoder_start_token_id=0, **T5_LARGE)
    torch.manual_seed(0)
    with torch.device(device):
        model = T5EncoderModel(config)
    return TextEncoder(tokenizer, model.to(dtype), kind="t5")


def build_vae(name: str, device: torch.device):
    """The mel VAE, fp32 (decoding runs in fp32): ``tiny`` from models/tiny.py, ``paper`` the paper's size."""
    from models.audio_vae import AudioVAE, AudioVAEConfig
    from models.config_io import from_dict
    from models.tiny import make_tiny_audio_vae

    if name == "tiny":
        with tempfile.TemporaryDirectory() as folder:
            return AudioVAE.from_pretrained(make_tiny_audio_vae(folder), device)
    torch.manual_seed(0)
    with torch.device(device):
        return AudioVAE(from_dict(AudioVAEConfig, {"preset": name})).eval()


def build_model(preset_name: str, cap_feat_dim: int, device: torch.device):
    """Our Next-DiT of the preset, fp32, with every modulation, gate and output weight non-zero (at init they are zero,
    and each block would be the identity) and the norms' affine terms moved off their initial 1 and 0."""
    from models import NextDiT, preset

    cfg = preset(preset_name, cap_feat_dim=cap_feat_dim)
    if cfg.modality != "audio":
        raise SystemExit(f"preset {preset_name!r} is not an audio model (modality {cfg.modality})")
    torch.manual_seed(0)
    with torch.device(device):
        model = NextDiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name or "cap_embedder.1" in name:
                p.normal_(std=0.02)
            elif name.endswith("attention.gate"):
                p.normal_(std=0.5)  # the cross-attention must weigh in for the reference check to see it
            elif "norm" in name:  # norm weights off 1 and biases off 0: the check sees every affine term
                p.add_(torch.randn_like(p), alpha=0.1)
    return model.eval()


STAGES = ("text_encode", "model", "vae_decode", "vocoder")


def time_stages(sampler, device: torch.device) -> dict[str, float]:
    """Wraps the Sampler's own components on the instance (text encoder ``encode``, the transformer call ``forward``,
    the VAE's ``decode``, the vocoder's ``vocode``), so that a ``generate`` call adds each one's wall time (ms) to the
    returned dict; CUDA is synchronised around each call."""
    spent: dict[str, float] = {}

    def timing(stage, fn):
        def wrapped(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent[stage] = spent.get(stage, 0.0) + (time.perf_counter() - began) * 1000
            return out
        if hasattr(fn, "dtype"):  # velocity_fn casts the model's inputs to its dtype
            wrapped.dtype = fn.dtype
        return wrapped

    sampler.text_encoder.encode = timing("text_encode", sampler.text_encoder.encode)
    sampler.forward = timing("model", sampler.forward)
    sampler.vae.decode = timing("vae_decode", sampler.vae.decode)
    sampler.vocoder.vocode = timing("vocoder", sampler.vocoder.vocode)
    return spent


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("audio", __doc__, preset="tiny-audio", gpu_preset="audio")
    parser.set_defaults(preset=None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per clip (the audio preset's 10-s clips)")
    parser.add_argument("--steps", type=int, default=10, help="solver steps (midpoint: 2 CFG-pair forwards each)")
    parser.add_argument("--solver", default="midpoint")
    parser.add_argument("--batch", type=int, default=1, help="clips per batched solve")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA")
    parser.add_argument("--text-encoder", choices=TEXT_ENCODERS, default=None,
                        help="default: t5-large on CUDA, tiny on CPU")
    parser.add_argument("--vae", choices=VAES, default=None, help="default: paper on CUDA, tiny on CPU")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="whole-clip and per-stage timings")
    parser.add_argument("--step-repeats", type=int, default=10, help="interleaved ours / reference step timings")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args = parser.parse_args(argv)

    from models.audio import clip_shape
    from models.flow import pad_captions, solve, velocity_fn
    from models.sampler import CAPTION_PAD, GenerationRequest, Sampler, SamplerConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if cuda else "fp32")]
    preset_name = args.preset or ("audio" if cuda else "tiny-audio")
    te_name = args.text_encoder or ("t5-large" if cuda else "tiny")
    vae_name = args.vae or ("paper" if cuda else "tiny")
    if not 1 <= args.batch <= len(PROMPTS):
        raise SystemExit(f"--batch must be in 1..{len(PROMPTS)}")
    encoder = build_text_encoder(te_name, device, dtype)
    vae = build_vae(vae_name, device)
    model = build_model(preset_name, encoder.hidden_size, device)
    cfg = model.config
    clip = clip_shape(vae, args.duration)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | Next-DiT {preset_name} ({params / 1e6:.1f} M params), "
          f"{str(dtype).removeprefix('torch.')} | text encoder {te_name} | mel VAE {vae_name} | "
          f"{args.batch} × {args.duration:g} s clips = latent ({cfg.in_channels}, 1, {clip.latent_frames}) each | "
          f"{args.steps} {args.solver} steps, CFG {args.guidance}")

    # ---- the step: our forward vs the reference, same weights and inputs (captions as the Sampler pads them) -----
    prompts = list(PROMPTS[: args.batch])
    encoded = {p: encoder.encode([p]) for p in prompts + [""]}
    length = max(f.shape[1] for f, _ in encoded.values()) + CAPTION_PAD

    def captions(texts):
        padded = [pad_captions(encoded[p][0].float(), encoded[p][1], length) for p in texts]
        return torch.cat([f for f, _ in padded]).to(device), torch.cat([m for _, m in padded]).to(device)

    feats, mask = captions(prompts)
    uncond_feats, uncond_mask = captions([""] * args.batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, *clip.latent, generator=gen).to(device)
    reference = ReferenceNextDiT1D(cfg, model.state_dict())
    with torch.no_grad():  # the check, in fp32 before anything is timed
        pair_t = torch.full((2 * args.batch,), 0.5, device=device)
        pair = (torch.cat([x, x]), pair_t, torch.cat([feats, uncond_feats]), torch.cat([mask, uncond_mask]))
        ours_out, ref_out = model(*pair), reference(*pair)
    atol = MATCH_TOL * float(ref_out.abs().max())
    matched = ours_out.shape == ref_out.shape and bool(torch.allclose(ours_out, ref_out, rtol=MATCH_TOL, atol=atol))
    max_diff, rel_fp32 = float((ours_out - ref_out).abs().max()), relative(ours_out, ref_out)
    print(f"reference check (fp32, CFG pair at t = 0.5): allclose(rtol={MATCH_TOL:g}, atol={atol:.1e}) {matched} | "
          f"max |Δ| {max_diff:.1e} | rel. diff {rel_fp32:.1e}")
    if not matched:
        raise SystemExit("the reference does not compute what our Next-DiT computes: no timing of unequal work")
    model.to(dtype)
    reference.to(device, dtype)

    def step(forward):
        fn = velocity_fn(forward, feats, mask, uncond_feats, uncond_mask, guidance=args.guidance)
        with torch.no_grad():
            return solve(fn, x, [0.0, 0.1], "euler").x

    rel_step = relative(step(model), step(reference))
    (ours_ms, ours_min), (ref_ms, ref_min) = timed_pair([lambda: step(model), lambda: step(reference)], device,
                                                        args.warmup + 1, args.step_repeats)
    print(f"sampler step (one CFG-pair forward, batch {2 * args.batch} × {clip.latent_frames} frames): ours "
          f"{ours_ms:.2f} ms (min {ours_min:.2f}) | plain-PyTorch reference {ref_ms:.2f} ms (min {ref_min:.2f}) | "
          f"ratio ours/reference {ours_ms / ref_ms:.3f} | rel. diff of the step in {str(dtype).removeprefix('torch.')}"
          f" {rel_step:.1e}")

    # ---- the whole clip through the Sampler, split by stage within the same runs ---------------------------------
    config = SamplerConfig(steps=args.steps, solver=args.solver, guidance=args.guidance, batch_size=args.batch)
    sampler = Sampler(model, encoder, vae, config)
    requests = [GenerationRequest(p, duration=args.duration, seed=i) for i, p in enumerate(prompts)]
    spent = time_stages(sampler, device)
    results = sampler.generate(requests)
    if any(r.audio is None or r.audio.shape != (clip.samples,) for r in results):
        raise RuntimeError(f"expected {args.batch} waveforms of {clip.samples} samples")
    runs = []
    for i in range(args.warmup + args.repeats):
        spent.clear()
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        sampler.generate(requests)
        if cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - began) * 1000
        if i >= args.warmup:
            runs.append({"total": total, **{k: spent.get(k, 0.0) for k in STAGES}})
    # the median run (by total), split: its stages add up to its total. The solve is what the Sampler spends outside
    # the other stages (the model evaluations, the solver's updates, CFG, noise and captions); the model's own share
    # of it is measured too.
    median = sorted(runs, key=lambda r: r["total"])[(len(runs) - 1) // 2]
    total_ms, total_min = median["total"], min(r["total"] for r in runs)
    stages = {"text_encode": median["text_encode"],
              "solve": median["total"] - median["text_encode"] - median["vae_decode"] - median["vocoder"],
              "vae_decode": median["vae_decode"], "vocoder": median["vocoder"]}
    audio_s = args.batch * clip.seconds
    rtf = audio_s / (total_ms / 1000)
    nfe = results[0].metadata["nfe"]
    vocoder_name = results[0].metadata.get("vocoder", "griffin_lim")
    print(f"whole clip{'s' if args.batch > 1 else ''}: {args.batch} × {clip.seconds:g} s of audio in {total_ms:.1f} ms "
          f"(median of {args.repeats}, min {total_min:.1f}; {nfe} NFE) | real-time factor {rtf:.2f} s of audio per s")
    print("stages of that run: "
          + " | ".join(f"{k.replace('_', ' ')} {v:.1f} ms ({v / total_ms:.0%})" for k, v in stages.items())
          + f" | model forwards {median['model']:.1f} ms of the solve | vocoder: {vocoder_name}")
    row = dict(bench="audio", device=name, preset=preset_name, dtype=str(dtype), text_encoder=te_name, vae=vae_name,
               vocoder=vocoder_name, duration=clip.seconds, batch=args.batch, steps=args.steps, solver=args.solver,
               nfe=nfe, latent_frames=clip.latent_frames, total_ms=total_ms, total_min_ms=total_min, rtf=rtf,
               stages_ms=stages,
               model_ms=median["model"], step_ours_ms=ours_ms, step_ref_ms=ref_ms, step_ratio=ours_ms / ref_ms,
               reference_matched=matched, reference_max_diff=max_diff, reference_rel_err=rel_fp32,
               step_rel_err=rel_step)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0
