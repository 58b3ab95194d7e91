"""Synthetic construction-defect photos with Chinese risk reports: the embedded default dataset.

``riskva synth --output_path DIR`` writes a dataset in exactly the seed's raw layout::

    DIR/metadata.csv        image_id,image_path,data_风险,data_纠正和预防建议,data_风险等级,data_缺陷描述
    DIR/images/000000.jpg   one photo per row
    DIR/synth_manifest.json seed, size, and per image: defect type, surface, location, measurements

so that every later step (validate, prepare, train, evaluate) can run with no private data.

Photos are rendered with numpy + Pillow: a wall surface (painted plaster, bare concrete or a
tile grid) with texture, lighting gradient, colour cast and sensor noise, plus one defect
(``synth_surfaces`` draws the wall and camera, ``synth_defects`` the defect, with the building
blocks of ``synth_raster``; this module plans each image, labels it and writes the dataset).
The defect types are deliberately distinct in colour and shape, so that a model has to look
at the picture to tell them apart:

=========  ===========================================================================
crack      dark thin jagged polylines (plaster or concrete)
mould      clusters of dark green / black speckles (plaster or concrete)
leakage    yellow-brown blotch with darker tide-mark rings and drips (plaster or concrete)
spalling   recessed broken concrete patch with rust-orange reinforcing bars
peeling    jagged patches of grey render where the paint is gone, shadowed edges, curled flakes
tile       tile grid with cracked, hollow (tilted, dark gaps) and missing tiles
=========  ===========================================================================

Severity rule (风险等级)
------------------------
The level is computed from what was actually drawn (``severity_level``): each type has one or
two measurements with two thresholds; the level is the highest one any measurement reaches.
The generator samples the measurements well inside each band, so neighbouring levels are
visibly far apart even at 224 px. Lengths and widths are relative: ``length_ratio`` is the
total crack length divided by the image width, ``width_ratio`` the crack width divided by the
shorter image side, ``area_fraction`` the share of the image covered by the defect.

===========  ==================  ==========  ==========  ====================================
type         measurement         中等 from   严重 from   sampled bands 轻微 / 中等 / 严重
===========  ==================  ==========  ==========  ====================================
crack        length_ratio        0.55        1.5         0.22–0.38 (1 crack) / 0.8–1.2 (2–3)
                                                         / 1.9–2.6 (3–5, branched)
crack        width_ratio         0.0075      0.016       0.0045–0.006 / 0.010–0.013 / 0.021–0.03
mould        area_fraction       0.06        0.20        0.015–0.04 / 0.09–0.15 / 0.27–0.40
leakage      area_fraction       0.11        0.30        0.04–0.08 / 0.15–0.23 / 0.40–0.55
spalling     area_fraction       0.06        0.18        0.02–0.04 / 0.09–0.14 / 0.23–0.32
spalling     rebar_count         2           4           1 / 2–3 / 4–6 bars
peeling      area_fraction       0.055       0.19        0.015–0.035 / 0.08–0.14 / 0.25–0.38
tile         broken_tiles        2           6           1 / 3–4 (≥ 2 hollow, none missing)
                                                         / 7–10 (3–4 missing)
===========  ==================  ==========  ==========  ====================================

Levels are drawn ~45 / 35 / 20 % (轻微 / 中等 / 严重) and types with unequal frequencies
(``TYPE_WEIGHTS``), like real inspection data.

Text: 缺陷描述 is one phrase per (type, level) with the visible surface filled in, so a
model can reproduce it from the photo; 风险 (with the location, which a close-up cannot
show) and 纠正和预防建议 are drawn from several professional phrasings (``synth_text``).

Determinism: image ``i`` is rendered from ``numpy.random.SeedSequence([VERSION, seed, i])``,
so the bytes of every file depend only on (seed, index, image_size), never on the number of
worker processes. JPEGs are quality 90, 4:2:0, no EXIF. Large sizes (e.g. a phone's
4032×3024) are rendered at ≤ 768 px and upscaled, with full-resolution grain added.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np
from PIL import Image, ImageChops
from tqdm import tqdm

from riskva_core.synth import text as synth_text
from riskva_core.atomic import atomic_dir, write_bytes, write_json, write_text
from riskva_core.errors import RiskvaError
from riskva_core.schema import CSV_COLUMNS, FIELD_ADVICE, FIELD_DESC, FIELD_LEVEL, FIELD_RISK, LEVELS
from riskva_core.synth.defects import draw_defect
from riskva_core.synth.surfaces import camera, draw_surface, grain

# Bump when a change alters any output byte for the same seed: it is part of every image's seed.
GENERATOR_VERSION = 3

DEFECT_TYPES: tuple[str, ...] = ("crack", "mould", "leakage", "spalling", "peeling", "tile")
TYPE_WEIGHTS: tuple[float, ...] = (0.24, 0.16, 0.20, 0.12, 0.15, 0.13)
LEVEL_WEIGHTS: tuple[float, ...] = (0.45, 0.35, 0.20)

# type → {measurement: (中等 threshold, 严重 threshold)}; see the module docstring table.
SEVERITY_RULE: dict[str, dict[str, tuple[float, float]]] = {
    "crack": {"length_ratio": (0.55, 1.5), "width_ratio": (0.0075, 0.016)},
    "mould": {"area_fraction": (0.06, 0.20)},
    "leakage": {"area_fraction": (0.11, 0.30)},
    "spalling": {"area_fraction": (0.06, 0.18), "rebar_count": (2, 4)},
    "peeling": {"area_fraction": (0.055, 0.19)},
    "tile": {"broken_tiles": (2, 6)},
}

_SURFACES: dict[str, tuple[tuple[str, float], ...]] = {
    "crack": (("plaster", 0.6), ("concrete", 0.4)),
    "mould": (("plaster", 0.8), ("concrete", 0.2)),
    "leakage": (("plaster", 0.7), ("concrete", 0.3)),
    "spalling": (("concrete", 1.0),),
    "peeling": (("plaster", 1.0),),
    "tile": (("tile", 1.0),),
}
_MAX_WORK_SIDE = 768  # larger outputs are rendered at this size and upscaled
_MIN_WORK_SIDE = 256   # keeps 1-px cracks meaningful: measurements are taken at work size
_MAX_ASPECT = 4.0
JPEG_QUALITY = 90


def severity_level(defect_type: str, measurements: dict[str, float]) -> str:
    """The documented rule: the highest level that any of the type's measurements reaches."""
    index = 0
    for name, (mid, high) in SEVERITY_RULE[defect_type].items():
        value = measurements[name]
        index = max(index, 2 if value >= high else 1 if value >= mid else 0)
    return LEVELS[index]


# ---------------------------------------------------------------------------------------------
# One image.


def _work_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    f = min(1.0, _MAX_WORK_SIDE / max(w, h))
    if min(w, h) * f < _MIN_WORK_SIDE:
        f = _MIN_WORK_SIDE / min(w, h)
    return max(1, int(round(w * f))), max(1, int(round(h * f)))


def _rngs(seed: int, index: int) -> list[np.random.Generator]:
    # Independent streams: a change in how an image is drawn never shifts its plan or its text.
    return [np.random.default_rng(s) for s in np.random.SeedSequence([GENERATOR_VERSION, seed, index]).spawn(3)]


def plan_image(seed: int, index: int) -> dict[str, str]:
    """What image ``index`` will show (defect type, intended level, surface), without drawing it."""
    plan_rng = _rngs(seed, index)[0]
    dtype = DEFECT_TYPES[plan_rng.choice(len(DEFECT_TYPES), p=TYPE_WEIGHTS)]
    level = LEVELS[int(plan_rng.choice(3, p=LEVEL_WEIGHTS))]
    names, weights = zip(*_SURFACES[dtype])
    surface = names[int(plan_rng.choice(len(names), p=weights))]
    return {"defect_type": dtype, "level": level, "surface": surface}


def _render(seed: int, index: int, size: tuple[int, int]) -> tuple[bytes, dict]:
    _, img_rng, text_rng = _rngs(seed, index)
    plan = plan_image(seed, index)
    dtype, surface, level_index = plan["defect_type"], plan["surface"], LEVELS.index(plan["level"])

    ww, wh = _work_size(size)
    s = min(ww, wh)
    img, layout = draw_surface(img_rng, surface, wh, ww, s)
    measurements = draw_defect(img_rng, dtype, img, level_index, s, layout)
    level = severity_level(dtype, measurements)
    img = camera(img_rng, img, s)
    pil = Image.fromarray(np.round(img).astype(np.uint8), "RGB")
    if (ww, wh) != tuple(size):
        upscale = size[0] > ww
        pil = pil.resize(size, Image.Resampling.BICUBIC if upscale else Image.Resampling.LANCZOS)
        if upscale:  # a real sensor's grain at full resolution, not smeared by the upscale
            pil = ImageChops.add(pil, grain(img_rng, size), scale=1.0, offset=-128)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False, progressive=False)

    location = synth_text.LOCATIONS[dtype][surface]
    loc = location[int(text_rng.integers(len(location)))]
    risk = synth_text.RISKS[dtype][level]
    advice = synth_text.ADVICE[dtype][level]
    image_path = f"images/{index:06d}.jpg"
    record = {
        "image_id": str(index),
        "image_path": image_path,
        FIELD_RISK: risk[int(text_rng.integers(len(risk)))].format(loc=loc),
        FIELD_ADVICE: advice[int(text_rng.integers(len(advice)))].format(loc=loc),
        FIELD_LEVEL: level,
        FIELD_DESC: synth_text.DESCRIPTIONS[dtype][level].format(surface=synth_text.SURFACE_WORDS[surface]),
        "defect_type": dtype,
        "surface": surface,
        "location": loc,
        "measurements": measurements,
    }
    return buf.getvalue(), record


def render_image(seed: int, index: int, image_size: tuple[int, int] = (512, 384)) -> tuple[bytes, dict]:
    """JPEG bytes and the record (text fields, defect type, measurements) of one image."""
    return _render(seed, index, tuple(image_size))


def _render_to(task: tuple[int, int, tuple[int, int], str]) -> dict:
    seed, index, size, root = task
    data, record = _render(seed, index, size)
    write_bytes(Path(root) / record["image_path"], data)
    return record


# ---------------------------------------------------------------------------------------------
# Entry point.


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    output_path: Path
    num_images: int = 240
    seed: int = 0
    image_size: tuple[int, int] = (512, 384)
    num_workers: int | None = None

    def __post_init__(self) -> None:
        if int(self.num_images) < 1:
            raise RiskvaError(f"--num_images must be >= 1, got {self.num_images}")
        if int(self.seed) < 0:
            raise RiskvaError(f"--seed must be >= 0, got {self.seed}")
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 64:
            raise RiskvaError(f"--image_size must be two sides >= 64 (W H), got {list(self.image_size)}")
        if max(size) > _MAX_ASPECT * min(size):
            raise RiskvaError(f"--image_size aspect ratio must be at most {_MAX_ASPECT:g}:1, got {list(size)}")
        if self.num_workers is not None and int(self.num_workers) < 1:
            raise RiskvaError(f"--num_workers must be >= 1, got {self.num_workers}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "output_path", Path(self.output_path))


def _check_target(path: Path) -> None:
    # The whole folder is swapped in atomically, so never replace something that is not ours.
    if path.exists() and not path.is_dir():
        raise RiskvaError(f"--output_path {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "synth_manifest.json").is_file():
        raise RiskvaError(
            f"--output_path {path}: directory is not empty and holds no synth_manifest.json; "
            "refusing to replace it"
        )


def synth(output_path: str | os.PathLike, num_images: int = 240, seed: int = 0,
          image_size: tuple[int, int] = (512, 384), num_workers: int | None = None) -> Path:
    """Write the synthetic dataset to ``output_path``; return the path of its metadata.csv.

    The folder appears whole or not at all (built beside it, then swapped in), and an
    existing synthetic dataset there is replaced. Output bytes depend only on
    (seed, num_images, image_size).
    """
    cfg = SynthConfig(Path(output_path), num_images, seed, tuple(image_size), num_workers)
    _check_target(cfg.output_path)
    workers = cfg.num_workers or os.cpu_count() or 1
    workers = max(1, min(workers, cfg.num_images // 8 or 1))  # a pool only pays for itself on real work
    with atomic_dir(cfg.output_path) as tmp:
        tasks = [(cfg.seed, i, cfg.image_size, str(tmp)) for i in range(cfg.num_images)]
        bar = tqdm(total=cfg.num_images, desc="synth", unit="img", dynamic_ncols=True)
        records: list[dict] = []
        with bar:
            if workers == 1:
                for task in tasks:
                    records.append(_render_to(task))
                    bar.update()
            else:
                # fork where the platform has it: spawn would re-run a caller's unguarded script
                # (no ``if __name__ == "__main__"``), and the workers touch only numpy and Pillow,
                # so the parent's other threads (torch, tqdm) are never needed in a child.
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    for record in pool.map(_render_to, tasks, chunksize=4):
                        records.append(record)
                        bar.update()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in records:
            writer.writerow([r["image_id"], r["image_path"], r[FIELD_RISK], r[FIELD_ADVICE],
                             r[FIELD_LEVEL], r[FIELD_DESC]])
        write_text(tmp / "metadata.csv", out.getvalue())
        write_json(tmp / "synth_manifest.json", {
            "generator": "riskva_core.synth",
            "generator_version": GENERATOR_VERSION,
            "seed": cfg.seed,
            "num_images": cfg.num_images,
            "image_size": list(cfg.image_size),
            "work_size": list(_work_size(cfg.image_size)),
            "severity_rule": {t: {m: list(v) for m, v in rule.items()} for t, rule in SEVERITY_RULE.items()},
            "images": [
                {"image_id": r["image_id"], "image_path": r["image_path"], "defect_type": r["defect_type"],
                 "surface": r["surface"], "location": r["location"], "level": r[FIELD_LEVEL],
                 "measurements": r["measurements"]}
                for r in records
            ],
        })
    return cfg.output_path / "metadata.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="riskva synth",
        description="Generate the synthetic construction-defect dataset (metadata.csv + images/).",
    )
    parser.add_argument("--output_path", required=True,
                        help="dataset folder to create (replaced atomically if it holds an earlier synth dataset)")
    parser.add_argument("--num_images", type=int, default=240, help="number of photos (default: 240)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; same seed, same bytes (default: 0)")
    parser.add_argument("--image_size", type=int, nargs=2, default=[512, 384], metavar=("W", "H"),
                        help="photo width and height in pixels, each >= 64 (default: 512 384; "
                             "a phone is 4032 3024)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="worker processes (default: CPU count); never changes the output")
    args = parser.parse_args(argv)
    csv_path = synth(args.output_path, args.num_images, args.seed, tuple(args.image_size), args.num_workers)
    print(csv_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
