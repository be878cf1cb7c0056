"""``python -m jobs.bench image``: the latency of one whole image — text encode, the ODE solve with CFG, VAE decode —
through our ``Sampler`` against diffusers' ``LuminaPipeline`` holding the very same text encoder, VAE and (converted)
transformer weights, in one run, at the same number of model evaluations (our midpoint 10 steps = 20 NFE = the
pipeline's 20 Euler steps).

The components are random-initialised at their real shapes (nothing is downloaded): a Gemma-2B-shaped decoder (hidden
2048, 18 layers, 8 heads, 1 KV head, head dim 256, MLP 16384; a small word-level vocabulary, which changes only the
embedding table) and an SDXL-shaped AutoencoderKL (128/256/512/512 channels, 2 layers per block, decoded in fp32).
Target: under 1.5 s for 1024² on an H100 (docs/benchmarks.md#targets).

GPU: ``python -m jobs.bench image --device cuda --preset 2B-GQA --size 1024``; CPU (CI-sized): the defaults.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from jobs.benchmarks import append_rows, bench_parser
from jobs.benchmarks.model import build_pair, timed_pair, works

# Real component shapes (Lumina-Next: Gemma-2B text encoder, SDXL VAE) and CPU-sized stand-ins.
TEXT_ENCODERS = {
    "gemma-2b": dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                     num_key_value_heads=1, head_dim=256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32),
}
VAES = {
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025),
    "tiny": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, scaling_factor=0.13025),
}


def build_text_encoder(size: str, device: torch.device, dtype: torch.dtype):
    """(tokenizer, GemmaModel) of the named shape with random weights, built on the device."""
    from transformers import GemmaConfig, GemmaModel

    from models.tiny import vocabulary, word_level_tokenizer

    tokenizer, vocab = word_level_tokenizer(vocabulary(), "gemma")
    config = GemmaConfig(vocab_size=len(vocab), max_position_embeddings=512, pad_token_id=vocab["<pad>"],
                         bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], **TEXT_ENCODERS[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = GemmaModel(config)
    return tokenizer, model.to(dtype).eval()


def build_vae(size: str, device: torch.device):
    from diffusers import AutoencoderKL

    spec = dict(VAES[size])
    channels = spec.pop("block_out_channels")
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                            down_block_types=("DownEncoderBlock2D",) * len(channels),
                            up_block_types=("UpDecoderBlock2D",) * len(channels), **spec)
    return vae.eval()


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("image", __doc__)
    parser.add_argument("--text-encoder", choices=list(TEXT_ENCODERS), default=None,
                        help="default: gemma-2b on CUDA, tiny on CPU")
    parser.add_argument("--vae", choices=list(VAES), default=None, help="default: sdxl on CUDA, tiny on CPU")
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--steps", type=int, default=10, help="our midpoint steps; the peer runs 2× Euler steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp8", action="store_true", help="also time our Sampler with FP8 block projections")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both transformers (ours through SamplerConfig.compile)")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args = parser.parse_args(argv)

    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaPipeline

    from models.sampler import GenerationRequest, Sampler, SamplerConfig
    from models.schedules import ScheduleConfig
    from models.text_encoder import TextEncoder
    from models.vae import ImageVAE

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    te_size = args.text_encoder or ("gemma-2b" if cuda else "tiny")
    vae_size = args.vae or ("sdxl" if cuda else "tiny")
    tokenizer, gemma = build_text_encoder(te_size, device, dtype)
    # both sides decode in fp32 (docs/official-formats.md#vae-scaling-factors)
    autoencoder = build_vae(vae_size, device)
    ours, peer, cfg = build_pair(args.preset, device, dtype, cap_feat_dim=gemma.config.hidden_size)

    encoder = TextEncoder(tokenizer, gemma)
    image_vae = ImageVAE(autoencoder, VAES[vae_size]["scaling_factor"])
    sampler_config = SamplerConfig(steps=args.steps, solver="midpoint", schedule=ScheduleConfig(name="sigmoid"),
                                   guidance=args.guidance, compile=args.compile)
    sampler = Sampler(ours, encoder, image_vae, sampler_config)
    fp8_sampler = None
    if args.fp8:  # its own copy of the transformer, quantized; the text encoder and VAE are shared
        fp8_sampler = Sampler(copy.deepcopy(ours), encoder, image_vae, dataclasses.replace(sampler_config, fp8=True))
    pipeline = LuminaPipeline(transformer=peer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=autoencoder,
                              text_encoder=gemma, tokenizer=tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    if args.compile:
        pipeline.transformer = torch.compile(peer)
    prompt = "a photo of a red cat on a house under the sky at sunset"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | Next-DiT {args.preset}, text encoder {te_size}, "
          f"VAE {vae_size} | {args.size}² | {2 * args.steps} NFE with CFG {args.guidance}"
          + (" | both transformers compiled" if args.compile else ""))

    def run_ours(which=sampler):
        return which.generate([GenerationRequest(prompt, width=args.size, height=args.size, seed=0)])[0].image

    def run_peer():
        return pipeline(prompt, width=args.size, height=args.size, num_inference_steps=2 * args.steps,
                        guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0), output_type="np",
                        clean_caption=False).images[0]

    a, b = run_ours(), run_peer()
    if fp8_sampler and not works("whole image, ours FP8", lambda: run_ours(fp8_sampler)):
        fp8_sampler = None
    if a.shape != (args.size, args.size, 3) or b.shape[:2] != (args.size, args.size):
        raise RuntimeError(f"unexpected image shapes: ours {a.shape}, peer {b.shape}")
    contenders = [run_ours, run_peer] + ([lambda: run_ours(fp8_sampler)] if fp8_sampler else [])
    timings = timed_pair(contenders, device, args.warmup, args.repeats)
    (ours_ms, ours_min), (peer_ms, peer_min) = timings[:2]
    row = dict(bench="image", device=name, preset=args.preset, text_encoder=te_size, vae=vae_size, size=args.size,
               nfe=2 * args.steps, ours_ms=ours_ms, peer_ms=peer_ms, ratio=ours_ms / peer_ms, compiled=args.compile)
    print(f"whole image: ours {ours_ms:9.1f} ms (min {ours_min:.1f}) | diffusers LuminaPipeline {peer_ms:9.1f} ms "
          f"(min {peer_min:.1f}) | ratio ours/peer {row['ratio']:.3f}"
          + (" | target < 1500 ms (docs/benchmarks.md#targets, 1024² on an H100)" if cuda else ""))
    if fp8_sampler:
        row["ours_fp8_ms"] = timings[2][0]
        print(f"whole image: ours FP8 {row['ours_fp8_ms']:9.1f} ms | ratio ours FP8 / peer "
              f"{row['ours_fp8_ms'] / peer_ms:.3f}")
    append_rows(args.json, [row])
    return 0
