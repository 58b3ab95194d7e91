"""Drawing the synthetic photos' walls and camera: plaster, bare concrete, a tile grid, then
lighting, white balance and sensor noise. The defects are drawn by ``synth_defects``.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from riskva_core.synth import raster

_PAINTS = (  # painted plaster, RGB
    (236, 234, 226), (240, 232, 214), (222, 222, 218), (222, 230, 238),
    (236, 224, 206), (218, 230, 216), (240, 226, 196), (214, 224, 232),
)
_TILES = (
    (238, 238, 234), (236, 229, 212), (206, 208, 210), (198, 214, 226),
    (222, 206, 182), (178, 182, 186), (214, 226, 220),
)


def _plaster(rng: np.random.Generator, h: int, w: int, s: int) -> np.ndarray:
    color = np.asarray(_PAINTS[rng.integers(len(_PAINTS))], np.float32) + rng.normal(0, 4, 3)
    lum = (1.0 + 0.014 * raster.noise(rng, h, w, s * 0.35) + 0.008 * raster.noise(rng, h, w, s * 0.04)
           + 0.012 * raster.noise(rng, h, w, 2.5))  # uneven drying, roller marks, orange-peel
    img = color[None, None, :] * lum[..., None]
    if rng.random() < 0.35:  # a wall corner or ceiling junction casts a soft shadow band
        yy, xx = raster.grid(h, w)
        edge = (xx / w, 1.0 - xx / w, yy / h)[rng.integers(3)]
        img *= (1.0 - 0.16 * np.exp(-edge / rng.uniform(0.03, 0.08)))[..., None]
    return img


def _concrete(rng: np.random.Generator, h: int, w: int, s: int) -> np.ndarray:
    grey = rng.uniform(132, 172)
    tint = np.asarray([1.0 + rng.uniform(-0.02, 0.04), 1.0, 1.0 + rng.uniform(-0.04, 0.02)], np.float32)
    lum = (grey + 9 * raster.noise(rng, h, w, s * 0.4) + 6 * raster.noise(rng, h, w, s * 0.06)
           + 5 * raster.noise(rng, h, w, 2.0))
    img = lum[..., None] * tint[None, None, :]
    pores, draw = raster.canvas(h, w)
    for _ in range(int(rng.integers(25, 90) * (h * w) / (384 * 512))):  # air voids (bugholes)
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.002, 0.006) * s
        draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=255)
    if rng.random() < 0.6:  # formwork panel seams
        for _ in range(int(rng.integers(1, 3))):
            if rng.random() < 0.5:
                y = rng.uniform(0.1, 0.9) * h
                draw.line((0, y, w, y + rng.normal(0, 2)), fill=110, width=max(1, int(0.004 * s)))
            else:
                x = rng.uniform(0.1, 0.9) * w
                draw.line((x, 0, x + rng.normal(0, 2), h), fill=110, width=max(1, int(0.004 * s)))
    if rng.random() < 0.5:  # form-tie holes on a regular grid
        step = rng.uniform(0.3, 0.45) * s
        r = 0.012 * s
        ox, oy = rng.uniform(0, step), rng.uniform(0, step)
        for gy in np.arange(oy, h, step):
            for gx in np.arange(ox, w, step * 1.3):
                draw.ellipse((gx - r, gy - r, gx + r, gy + r), fill=200)
    raster.shade(img, raster.blur(raster.as_mask(pores), 0.6), 0.55)
    return img


def _tile_wall(rng: np.random.Generator, h: int, w: int, s: int) -> tuple[np.ndarray, dict]:
    py = rng.uniform(0.15, 0.2) * s
    px = py * (1.0 if rng.random() < 0.6 else 1.5)
    ox, oy = rng.uniform(0, px), rng.uniform(0, py)
    gap = max(2.0, rng.uniform(0.009, 0.014) * s)
    yy, xx = raster.grid(h, w)
    iy, ix = np.floor((yy - oy) / py), np.floor((xx - ox) / px)
    v, u = (yy - oy) / py - iy, (xx - ox) / px - ix
    ny, nx = int(h / py) + 3, int(w / px) + 3
    jitter = rng.normal(0, 3.5, size=(ny, nx)).astype(np.float32)
    jy, jx = (iy + 1).astype(np.int64).clip(0, ny - 1), (ix + 1).astype(np.int64).clip(0, nx - 1)
    color = np.asarray(_TILES[rng.integers(len(_TILES))], np.float32)
    gloss = 1.0 + 0.05 * (0.5 - u) + 0.04 * (0.5 - v)  # each glazed tile catches light a little
    img = (color[None, None, :] + jitter[jy, jx][..., None]) * gloss[..., None]
    img += 2.0 * raster.noise(rng, h, w, 2.0)[..., None]
    # Grout must read against the glaze, or the grid (and a missing tile) disappears.
    options = [g for g in (205.0, 185.0, 150.0, 110.0) if abs(g - float(color.mean())) >= 30]
    grout_color = np.float32(options[int(rng.integers(len(options)))])
    grout = ((u * px < gap / 2) | (u * px > px - gap / 2) | (v * py < gap / 2) | (v * py > py - gap / 2))
    grout_mask = raster.blur(grout.astype(np.float32), 0.6)
    raster.paint(img, grout_mask, (grout_color, grout_color * 0.99, grout_color * 0.97))
    # A window's soft reflection on the glaze.
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.15, 0.6) * h
    spec = np.exp(-(((xx - cx) / (0.35 * w)) ** 2 + ((yy - cy) / (0.25 * h)) ** 2))
    img += (18.0 * spec)[..., None]
    layout = {"px": px, "py": py, "ox": ox, "oy": oy, "gap": gap, "grout": float(grout_color)}
    return img, layout


def draw_surface(rng: np.random.Generator, surface: str, h: int, w: int, s: int) -> tuple[np.ndarray, dict]:
    """The bare wall: (image, layout); the layout (tile grid) is what a tile defect needs."""
    if surface == "tile":
        img, layout = _tile_wall(rng, h, w, s)
    else:
        img, layout = (_plaster if surface == "plaster" else _concrete)(rng, h, w, s), {}
    return np.ascontiguousarray(img, dtype=np.float32), layout


def camera(rng: np.random.Generator, img: np.ndarray, s: int) -> np.ndarray:
    """Lighting falloff, white balance, exposure and sensor noise of a site photo."""
    h, w = img.shape[:2]
    yy, xx = raster.grid(h, w)
    a = rng.uniform(0, 2 * math.pi)
    grad = ((xx / w - 0.5) * math.cos(a) + (yy / h - 0.5) * math.sin(a)) * rng.uniform(0.1, 0.3)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    light = rng.uniform(0.9, 1.05) * (1.0 + grad - rng.uniform(0.04, 0.14) * r2)
    t = rng.uniform(-0.04, 0.04)
    img *= light[..., None] * np.float32([1 + t, 1.0, 1 - t])[None, None, :]
    img += rng.normal(0, rng.uniform(1.5, 4.0), size=(h, w, 1)).astype(np.float32)
    img += rng.normal(0, 1.2, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255)


def grain(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Luminance grain around 128, tiled from one random patch (cheap at 12 MP, never visible)."""
    patch = np.clip(128 + np.round(rng.normal(0, 2.2, size=(509, 509, 1))), 0, 255).astype(np.uint8)
    tile = Image.fromarray(np.repeat(patch, 3, axis=2), "RGB")
    out = Image.new("RGB", size)
    for y in range(0, size[1], 509):
        for x in range(0, size[0], 509):
            out.paste(tile, (x, y))
    return out
