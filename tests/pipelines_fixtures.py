"""Corpora and tiny models for the curation tests, all generated here (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Bad inputs of the corrupted corpus and the reject reason each must get.
BAD_FILES = {
    "bad_truncated.jpg": "truncated",
    "bad_zero.jpg": "empty_file",
    "bad_text.png": "not_decodable",
    "bad_huge.png": "too_many_pixels",
    "bad_nan.wav": "nan",
    "bad_silent.wav": "silent",
    "bad_empty.obj": "empty_shape",
    "bad_degenerate.obj": "degenerate",
}


def make_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A distinct image: random smooth gradients plus noise (never flat, so perceptual hashes differ)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        out[..., c] = 127 + 100 * np.sin(fx * x / width * 6.28 + phase) * np.cos(fy * y / height * 6.28)
    out += rng.normal(0, 12, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, seed: int = 0, sizes=None) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [(320, 240), (240, 320), (256, 256), (400, 200), (300, 300), (180, 360), (512, 384)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        fmt = ("jpg", "png", "webp")[i % 3]
        path = folder / f"img_{seed}_{i:03d}.{fmt}"
        Image.fromarray(make_image(rng, w, h)).save(path, quality=90) if fmt != "png" else \
            Image.fromarray(make_image(rng, w, h)).save(path)
        if i % 4 == 0:
            path.with_suffix(".txt").write_text(f"a photo number {i}")
        elif i % 4 == 1:
            path.with_suffix(".json").write_text(json.dumps({"caption": f"a drawing number {i}", "license": "cc0"}))
        paths.append(path)
    return paths


def wav_bytes(wave: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def write_audio(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed + 100)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rate = (16000, 22050, 44100)[i % 3]
        duration = 2.5 + (i % 4)
        t = np.arange(int(rate * duration)) / rate
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t) + 0.02 * rng.normal(size=t.shape)
        if i % 2:
            wave = np.stack([wave, wave * 0.5], axis=1)  # stereo
        ext = "flac" if i % 3 == 2 else "wav"
        path = folder / f"snd_{seed}_{i:03d}.{ext}"
        path.write_bytes(wav_bytes(wave.astype(np.float32), rate, fmt=ext.upper()))
        path.with_suffix(".txt").write_text(f"a tone number {i}")
        paths.append(path)
    return paths


CUBE_OBJ = """v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1
f 1 2 3\nf 1 3 4\nf 5 6 7\nf 5 7 8\nf 1 2 6\nf 1 6 5\nf 2 3 7\nf 2 7 6\nf 3 4 8\nf 3 8 7\nf 4 1 5\nf 4 5 8
"""
def cube_obj(stretch: float = 1.0) -> str:
    """A box mesh, stretched along x (so every generated box is a distinct file)."""
    lines = []
    for ln in CUBE_OBJ.splitlines():
        if ln.startswith("v "):
            x, y, z = (float(v) for v in ln.split()[1:])
            ln = f"v {x * stretch} {y} {z}"
        lines.append(ln)
    return "\n".join(lines) + "\n"


TETRA_OFF = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"


def ply_sphere(n: int = 12) -> bytes:
    """An ASCII PLY UV-sphere mesh."""
    verts, faces = [], []
    for i in range(n + 1):
        th = np.pi * i / n
        for j in range(n):
            ph = 2 * np.pi * j / n
            verts.append((np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)))
    for i in range(n):
        for j in range(n):
            a, b = i * n + j, i * n + (j + 1) % n
            c, d = a + n, b + n
            faces += [(a, b, d), (a, d, c)]
    lines = ["ply", "format ascii 1.0", f"element vertex {len(verts)}", "property float x", "property float y",
             "property float z", f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    lines += [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts] + [f"3 {a} {b} {c}" for a, b, c in faces]
    return ("\n".join(lines) + "\n").encode()


def write_shapes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed + 200)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            path = folder / f"shape_{seed}_{i:03d}.obj"
            path.write_text(cube_obj(rng.uniform(0.5, 3)))
        elif kind == 1:
            path = folder / f"shape_{seed}_{i:03d}.off"
            path.write_text(TETRA_OFF)
        elif kind == 2:
            path = folder / f"shape_{seed}_{i:03d}.ply"
            path.write_bytes(ply_sphere(8 + i))
        elif kind == 3:
            path = folder / f"shape_{seed}_{i:03d}.npy"
            np.save(path, rng.normal(size=(3000 + 100 * i, 3)).astype(np.float32))
        else:
            path = folder / f"shape_{seed}_{i:03d}.npz"
            np.savez(path, points=rng.uniform(-1, 1, size=(2500, 6)).astype(np.float32))
        paths.append(path)
    return paths


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG that claims width×height pixels (a decompression bomb) — only the header and one row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_bad_files(folder: Path) -> dict[str, str]:
    """The corrupted corpus of the issue; returns {file name: expected reject reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(make_image(rng, 320, 240)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    (folder / "bad_truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (folder / "bad_zero.jpg").write_bytes(b"")
    (folder / "bad_text.png").write_text("this is not an image, it is a text file saved as .png\n")
    (folder / "bad_huge.png").write_bytes(huge_png_header())
    wave = (0.2 * np.sin(np.linspace(0, 2000, 16000 * 3))).astype(np.float32)
    wave[1000:1100] = np.nan
    (folder / "bad_nan.wav").write_bytes(wav_bytes(wave, 16000, subtype="FLOAT"))
    (folder / "bad_silent.wav").write_bytes(wav_bytes(np.zeros(16000 * 3, np.float32), 16000))
    (folder / "bad_empty.obj").write_text("# an OBJ file with no geometry at all\n")
    (folder / "bad_degenerate.obj").write_text("v 0 0 0\nv 1 1 1\nv 2 2 2\nv 3 3 3\nf 1 2 3\nf 2 3 4\n")
    return dict(BAD_FILES)


# ---- tiny random models, saved with save_pretrained and loaded back by path -------------------------------------------
WORDS = ("a photo of the cat dog red blue green sound music noise object chair table tone drawing number shape "
         "bright dark small large").split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def tiny_tokenizer():
    """A word-level fast tokenizer built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + [str(i) for i in range(50)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=64)


def _save_captioner(model, tok, path) -> None:
    """The special token ids both tiny captioners generate with, then model and tokenizer saved in ``path``."""
    model.generation_config.decoder_start_token_id = 2
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    _no_special_words(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _no_special_words(model, tokenizer) -> None:
    """Random weights may emit EOS at once; forbid special tokens for a few steps so captions are never empty."""
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [tokenizer.unk_token_id]


def make_captioner(path: Path) -> str:
    """A VisionEncoderDecoder (tiny ViT + tiny GPT-2) image captioner."""
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    dec = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0, add_cross_attention=True, is_decoder=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    model = VisionEncoderDecoderModel(cfg)
    _save_captioner(model, tok, path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def make_clip(path: Path) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def make_aesthetic_head(path: Path, dim: int = 8) -> str:
    import torch
    from safetensors.torch import save_file

    from pipelines.scores import AestheticHead

    torch.manual_seed(0)
    save_file(AestheticHead(dim).state_dict(), str(path))
    return str(path)


def make_vae(path: Path) -> str:
    """A tiny random AutoencoderKL with 4 blocks, so its downsampling factor is 8 like the real ones."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(path)
    return str(path)


def make_text_encoder(path: Path) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_clap(path: Path) -> str:
    """A tiny CLAP (HTS-AT audio tower + RoBERTa-style text tower), unfused like laion/clap-htsat-unfused, with its
    48 kHz feature extractor (so the stage's resampling runs); the tokenizer's limit leaves RoBERTa's two position
    offsets, like the real one (512 of 514)."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tok.model_max_length = 30
    cfg = ClapConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, projection_dim=8),
        audio_config=dict(num_mel_bins=16, spec_size=64, window_size=4, patch_size=2, patch_stride=2, hidden_size=32,
                          patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], num_hidden_layers=2,
                          enable_fusion=False, projection_dim=8),
        projection_dim=8,
    )
    ClapModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=480, fft_window_size=1024, max_length_s=1,
                         truncation="rand_trunc").save_pretrained(path)
    return str(path)


def make_audio_captioner(path: Path) -> str:
    """A tiny Whisper (speech-to-text encoder–decoder) with a 2-second window instead of 30 s."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = WhisperConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                        max_source_positions=100, max_target_positions=64, pad_token_id=0, bos_token_id=2,
                        eos_token_id=3, decoder_start_token_id=2)
    model = WhisperForConditionalGeneration(cfg)
    _save_captioner(model, tok, path)
    # 2 s windows: 200 frames of hop 160 = 2 × max_source_positions (Whisper's convolutions halve the frames)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=2,
                            n_fft=400).save_pretrained(path)
    return str(path)
