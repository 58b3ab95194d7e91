"""Small vectorised building blocks for drawing the synthetic photos.

Images are float32 H×W×3 arrays in 0..255, masks H×W float32 in 0..1; everything is numpy or
Pillow, so a drawing depends only on its random generator.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance noise whose blobs are about ``cell`` pixels wide."""
    gh = max(3, int(math.ceil(h / max(cell, 1.0))) + 2)
    gw = max(3, int(math.ceil(w / max(cell, 1.0))) + 2)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    out = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return (out - out.mean()) / (out.std() + 1e-6)


def blur(mask: np.ndarray, radius: float) -> np.ndarray:
    img = Image.fromarray(np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def canvas(h: int, w: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (w, h), 0)
    return img, ImageDraw.Draw(img)


def as_mask(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def paint(img: np.ndarray, mask: np.ndarray, color: Any, alpha: float = 1.0) -> None:
    """Alpha-blend ``color`` (RGB tuple or H×W×3 array) into ``img`` where ``mask`` is set."""
    a = (mask * alpha)[..., None]
    img *= 1.0 - a
    img += a * np.asarray(color, dtype=np.float32)


def shade(img: np.ndarray, mask: np.ndarray, factor: float) -> None:
    """Multiply brightness by ``factor`` where ``mask`` is set (shadows < 1 < highlights)."""
    img *= (1.0 + (factor - 1.0) * mask)[..., None]


def threshold_top(score: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``fraction`` highest-scoring pixels (exact area control)."""
    flat = score.ravel()
    k = int(round((1.0 - fraction) * (flat.size - 1)))
    cut = np.partition(flat, k)[k]
    return score > cut


def blob(rng: np.random.Generator, cx: float, cy: float, r: float, jag: float,
          stretch: float = 1.0, n: int = 48) -> list[tuple[float, float]]:
    """An irregular closed polygon: a circle with random low- and high-frequency wobble."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 6):
        rad += rng.uniform(0.0, 0.12) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    rad += jag * rng.uniform(-1.0, 1.0, size=n)
    rad = np.clip(rad, 0.45, 1.6) * r
    return list(zip((cx + rad * np.cos(t) * stretch).tolist(), (cy + rad * np.sin(t) / stretch).tolist()))


def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) with zeros shifted in (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out
