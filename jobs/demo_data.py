"""The built-in demo data set, made by code: captioned coloured shapes, captioned tones, labelled primitive point clouds,
and a handful of corrupt files that the curation job must reject (and count) without failing.

Every file is deterministic for a given seed. Captions are sidecar ``.txt`` files, as users' folders usually have them.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "grey": (200, 200, 200)}
IMAGE_SIZES = ((128, 128), (160, 128), (128, 160))  # (width, height): several aspect ratios → several buckets
# four pitches an octave apart (A3 to A6), each named by its frequency in the caption: "a tone at 440 hertz"
PITCHES_HZ = (220, 440, 880, 1760)
SAMPLE_RATE = 16000
SOLIDS = ("sphere", "cube", "cylinder")


@dataclass
class DemoCounts:
    images: int = 480
    tones: int = 48  # the audio model's training set: an equal share of every pitch
    solids: int = 48  # the points model's training set: an equal share of every solid


def shape_image(colour: str, shape: str, background: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One shape, large enough to dominate the picture, at a random position and scale."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    side = int(min(width, height) * rng.uniform(0.45, 0.7))
    x0 = int(rng.uniform(0, width - side))
    y0 = int(rng.uniform(0, height - side))
    box = (x0, y0, x0 + side, y0 + side)
    fill = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def solid_points(solid: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points on the surface of a unit solid."""
    if solid == "sphere":
        p = rng.normal(size=(n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if solid == "cube":
        p = rng.uniform(-1, 1, size=(n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = np.sign(rng.uniform(-1, 1, n))
        return p
    theta = rng.uniform(0, 2 * math.pi, n)
    return np.stack([np.cos(theta), np.sin(theta), rng.uniform(-1, 1, n)], axis=1)


CUBE_OBJ = """v -1 -1 -1\nv 1 -1 -1\nv 1 1 -1\nv -1 1 -1\nv -1 -1 1\nv 1 -1 1\nv 1 1 1\nv -1 1 1
f 1 2 3\nf 1 3 4\nf 5 6 7\nf 5 7 8\nf 1 2 6\nf 1 6 5\nf 2 3 7\nf 2 7 6\nf 3 4 8\nf 3 8 7\nf 4 1 5\nf 4 5 8
"""


def tone_caption(hertz: int) -> str:
    return f"a tone at {hertz} hertz"


def solid_caption(solid: str) -> str:
    return f"a {solid}"


def write_corrupt_files(root: Path) -> dict[str, str]:
    """The bad inputs of the corrupted-corpus check; returns {relative path: what is wrong}."""
    bad = root / "images"
    bad.mkdir(parents=True, exist_ok=True)
    good = shape_image("red", "circle", "white", (128, 128), np.random.default_rng(0))
    good.save(bad / "corrupt_truncated.jpg", quality=90)
    data = (bad / "corrupt_truncated.jpg").read_bytes()
    (bad / "corrupt_truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "corrupt_empty.png").write_bytes(b"")
    (bad / "corrupt_text.png").write_text("this is not an image\n")
    (root / "audio").mkdir(exist_ok=True)
    write_wav(root / "audio" / "corrupt_silent.wav", np.zeros(SAMPLE_RATE))
    (root / "points").mkdir(exist_ok=True)
    (root / "points" / "corrupt_empty.obj").write_text("# no vertices\n")
    (root / "points" / "corrupt_degenerate.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    return {
        "images/corrupt_truncated.jpg": "truncated JPEG",
        "images/corrupt_empty.png": "zero-byte file",
        "images/corrupt_text.png": "text saved as .png",
        "audio/corrupt_silent.wav": "silent audio",
        "points/corrupt_empty.obj": "mesh without vertices",
        "points/corrupt_degenerate.obj": "degenerate mesh (zero area)",
    }


def build_demo_dataset(root: str | Path, counts: DemoCounts | None = None, seed: int = 0,
                       corrupt: bool = True) -> dict:
    """Write the demo corpus under ``root`` (images/, audio/, points/). Returns a summary."""
    root = Path(root)
    counts = counts or DemoCounts()
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(counts.images):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        size = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        name = f"shape_{i:05d}"
        shape_image(colour, shape, background, size, rng).save(root / "images" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(f"a {colour} {shape} on a {background} background")
    (root / "audio").mkdir(exist_ok=True)
    for i in range(counts.tones):
        hertz = PITCHES_HZ[i % len(PITCHES_HZ)]
        seconds = float(rng.uniform(1.0, 3.0))
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        tone = 0.5 * np.sin(2 * math.pi * hertz * t) * np.minimum(1, 20 * t) * np.minimum(1, 20 * (seconds - t))
        write_wav(root / "audio" / f"tone_{i:04d}.wav", tone + rng.normal(0, 0.003, t.shape))
        (root / "audio" / f"tone_{i:04d}.txt").write_text(tone_caption(hertz))
    (root / "points").mkdir(exist_ok=True)
    for i in range(counts.solids):
        solid = SOLIDS[i % len(SOLIDS)]
        if solid == "cube" and i % 2:
            (root / "points" / f"solid_{i:04d}.obj").write_text(CUBE_OBJ)
        else:
            np.save(root / "points" / f"solid_{i:04d}.npy", solid_points(solid, 2048, rng).astype(np.float32))
        (root / "points" / f"solid_{i:04d}.txt").write_text(solid_caption(solid))
    bad = write_corrupt_files(root) if corrupt else {}
    return {"root": str(root), "images": counts.images, "tones": counts.tones, "solids": counts.solids,
            "corrupt": bad}


def reference_solids(points: int = 2048, seed: int = 1234) -> dict[str, np.ndarray]:
    """One dense cloud per built-in solid, placed on the unit sphere as jobs.prepare places every cloud: what a
    generated cloud is compared with (``nearest_solid``)."""
    from pipelines.decode import normalise_unit_sphere

    rng = np.random.default_rng(seed)
    return {solid: normalise_unit_sphere(solid_points(solid, points, rng)) for solid in SOLIDS}


def nearest_solid(cloud: np.ndarray, references: dict[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    """The built-in solid nearest to ``cloud`` (N, 3) by Chamfer distance, and the distance to each."""
    import torch

    from models.point_metrics import chamfer

    x = torch.from_numpy(np.asarray(cloud, dtype=np.float32))[None]
    distances = {solid: float(chamfer(x, torch.from_numpy(ref)[None])[0]) for solid, ref in references.items()}
    return min(distances, key=distances.get), distances


def dominant_colour(image: np.ndarray) -> str:
    """The named colour closest to the mean of the pixels that are not background-like (saturated ones)."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    saturation = pixels.max(1) - pixels.min(1)
    chosen = pixels[saturation > 60]
    if len(chosen) < 0.02 * len(pixels):
        return "none"
    mean = chosen.mean(0)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - mean) ** 2)))


def prompt_colour(prompt: str) -> str | None:
    """The colour a prompt names (the first word of it that is one of ``COLOURS``), None when it names none."""
    return next((word for word in prompt.lower().split() if word in COLOURS), None)


def colour_fidelity(samples: list) -> dict[str, float]:
    """The demo report's prompt fidelity as an in-training evaluation scorer (``eval.scorers:
    [jobs.demo_data:colour_fidelity]``, docs/training.md#in-training-evaluation): the share of the generated images
    (``EvalSample.result.image``) whose dominant colour is the colour their prompt names; chance is 1 / len(COLOURS).
    Samples without an image or whose prompt names no colour do not count (no number when none counts)."""
    scored = [dominant_colour(s.result.image) == prompt_colour(s.prompt) for s in samples
              if s.result.image is not None and prompt_colour(s.prompt) is not None]
    return {"colour_fidelity": float(np.mean(scored))} if scored else {}


def pitch_fidelity(samples: list) -> dict[str, float]:
    """The demo report's audio fidelity as an in-training evaluation scorer (``jobs.demo_data:pitch_fidelity``): the
    share of the generated clips whose dominant pitch is the one their prompt names (``tone_caption``)."""
    named = {tone_caption(hertz): hertz for hertz in PITCHES_HZ}
    scored = [dominant_pitch(s.result.audio, s.result.sample_rate) == named[s.prompt] for s in samples
              if s.result.audio is not None and s.prompt in named]
    return {"pitch_fidelity": float(np.mean(scored))} if scored else {}


def solid_fidelity(samples: list) -> dict[str, float]:
    """The demo report's point fidelity as an in-training evaluation scorer (``jobs.demo_data:solid_fidelity``): the
    share of the generated clouds whose nearest built-in solid (Chamfer distance) is the one their prompt names
    (``solid_caption``)."""
    references = reference_solids()
    named = {solid_caption(solid): solid for solid in SOLIDS}
    scored = [nearest_solid(s.result.points, references)[0] == named[s.prompt] for s in samples
              if s.result.points is not None and s.prompt in named]
    return {"solid_fidelity": float(np.mean(scored))} if scored else {}


def dominant_frequency(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """The frequency (Hz) of the peak of the clip's magnitude spectrum (Hann-windowed FFT of the whole clip), 0 for
    silence; below 50 Hz (DC, rumble) does not count."""
    samples = np.asarray(waveform, dtype=np.float64).reshape(-1)
    if len(samples) < 2 or not np.any(samples):
        return 0.0
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    spectrum[freqs < 50] = 0
    return float(freqs[int(spectrum.argmax())]) if spectrum.max() > 0 else 0.0


def dominant_pitch(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> int | None:
    """The named pitch (one of ``PITCHES_HZ``) nearest to the clip's dominant frequency on a log scale, if it is within
    half an octave of it (the pitches are an octave apart, so each gets its own band); else None."""
    found = dominant_frequency(waveform, rate)
    if found <= 0:
        return None
    nearest = min(PITCHES_HZ, key=lambda hz: abs(math.log2(found / hz)))
    return nearest if abs(math.log2(found / nearest)) < 0.5 else None
