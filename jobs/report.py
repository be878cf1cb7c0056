"""Small PNG reports drawn with Pillow (no plotting stack needed): line charts (alone, or as panels side by side),
captioned image grids and spectrograms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "",
               x_label: str = "step", y_label: str = "loss", size: tuple[int, int] = (720, 420)) -> None:
    """Each named series of (x, y) points as a polyline on shared axes; writes a PNG."""
    chart_image(series, title, x_label, y_label, size).save(path)


def panels(charts: list[Image.Image], columns: int = 2) -> Image.Image:
    """Charts (of one size) side by side, ``columns`` to a row: one PNG with, e.g., a loss curve beside the quality
    curves of the same run."""
    width, height = charts[0].size
    rows = max(1, math.ceil(len(charts) / columns))
    sheet = Image.new("RGB", (min(columns, len(charts)) * width, rows * height), "white")
    for i, chart in enumerate(charts):
        sheet.paste(chart, ((i % columns) * width, (i // columns) * height))
    return sheet


def chart_image(series: dict[str, list[tuple[float, float]]], title: str = "", x_label: str = "step",
                y_label: str = "loss", size: tuple[int, int] = (720, 420), markers: bool = False) -> Image.Image:
    """``line_chart``'s picture, not yet written; ``markers`` draws a dot at every point (a curve of a few points,
    such as one evaluation every few hundred steps, and a series of one point are visible)."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        draw.text((left, height // 2), "no data", fill="black", font=font)
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    for i in range(5):  # grid and tick labels
        fy = y0 + (y1 - y0) * i / 4
        _, py = to_pixel(x0, fy)
        draw.line([left, py, width - right, py], fill=(230, 230, 230))
        draw.text((5, py - 6), f"{fy:.4g}", fill="black", font=font)
        fx = x0 + (x1 - x0) * i / 4
        px, _ = to_pixel(fx, y0)
        draw.text((px - 10, height - bottom + 5), f"{fx:.0f}", fill="black", font=font)
    for index, (name, values) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in values if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        if markers:
            for px, py in pixels:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right - 150, top + 5 + 14 * index), f"— {name}", fill=colour, font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((width - left) // 2, height - 20), x_label, fill="black", font=font)
    draw.text((5, top - 20), y_label, fill="black", font=font)
    return image


def image_grid(images: list[np.ndarray], captions: list[str], path: str | Path, columns: int = 4,
               cell: int = 160) -> None:
    """Images (H×W×3 uint8) scaled into square cells with a caption under each; writes a PNG."""
    grid_image(images, captions, columns, cell).save(path)


def grid_image(images: list[np.ndarray], captions: list[str], columns: int = 4, cell: int = 160) -> Image.Image:
    """``image_grid``'s picture, not yet written."""
    rows = max(1, math.ceil(len(images) / columns))
    caption_height = 28
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (array, caption) in enumerate(zip(images, captions)):
        tile = Image.fromarray(array)
        tile.thumbnail((cell - 8, cell - 8))
        x = (i % columns) * cell + (cell - tile.width) // 2
        y = (i // columns) * (cell + caption_height) + 4
        grid.paste(tile, (x, y))
        text_y = (i // columns) * (cell + caption_height) + cell
        for line_index, line in enumerate(_wrap(caption, 26)[:2]):
            draw.text(((i % columns) * cell + 4, text_y + 12 * line_index), line, fill="black", font=font)
    return grid


# a dark-to-bright map (black → purple → orange → yellow), for spectrograms
HEAT = np.array([(0, 0, 4), (80, 18, 123), (182, 54, 121), (251, 136, 97), (252, 253, 191)], dtype=np.float32)


def spectrogram_image(log_mel: np.ndarray, size: tuple[int, int] = (152, 152), floor: float = -11.5) -> np.ndarray:
    """A (n_mels, frames) log-mel as an H×W×3 uint8 picture of ``size`` (width, height): time to the right, low
    frequencies at the bottom, values from ``floor`` (silence: log 1e-5) to the clip's maximum mapped dark → bright."""
    values = np.asarray(log_mel, dtype=np.float32)
    top = max(float(values.max()), floor + 1e-3)
    scaled = np.clip((values - floor) / (top - floor), 0, 1)[::-1]  # row 0 is the highest mel bin
    position = scaled * (len(HEAT) - 1)
    low = np.minimum(position.astype(int), len(HEAT) - 2)
    frac = (position - low)[..., None]
    rgb = (HEAT[low] * (1 - frac) + HEAT[low + 1] * frac).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.NEAREST))


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + ([current] if current else [])
