"""Prepare benchmark: our Parquet path vs the seed-style baseline vs a plain-Pillow ceiling.

Same synthetic photos (default 300 at 4032x3024, a phone's size), prepared three ways in one run:

  ours      riskva_core.prepare.prepare(format="parquet"): validation (pandera, full image
            checks, content hashes), split, worker processes, JPEG draft decoding,
            normalised JPEG, zstd Parquet with raw image bytes
  baseline  the seed's approach: one process, PIL open/convert/resize/save, base64 strings
            in a pandas DataFrame, DataFrame.to_parquet (same resample filter as ours)
  ceiling   the fastest plain-Pillow pipeline: JPEG draft decode, resize, encode in memory,
            one process per core, no validation, no output files

Prints images/s for each, ours/baseline and ours/ceiling, and our Parquet size over the
base64 variant's. Targets (2 cores): >= 3x baseline, >= 70 % of ceiling, size <= 0.8x.

    .venv/bin/python benchmarks/bench_prepare.py                 # 300 images, 4032x3024
    .venv/bin/python benchmarks/bench_prepare.py --num_images 40 # quicker
The synthetic images are cached (--cache_dir) and reused across runs.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from riskva_core.data.images import RESAMPLE, fit_size
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.synth.generate import synth


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ensure_dataset(cache_dir: Path, num_images: int, size: tuple[int, int]) -> Path:
    folder = cache_dir / f"synth_{num_images}_{size[0]}x{size[1]}_seed0"
    if not (folder / "metadata.csv").exists():
        print(f"generating {num_images} synthetic {size[0]}x{size[1]} images into {folder} (cached for next runs)", flush=True)
        synth(folder, num_images=num_images, seed=0, image_size=size)
    return folder


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def baseline(csv_path: Path, root: Path, out: Path, max_size: tuple[int, int], quality: int) -> None:
    """The seed-style script: sequential PIL, base64 text column, pandas to_parquet."""
    records = []
    for r in _rows(csv_path):
        img = Image.open(root / r["image_path"]).convert("RGB")
        img = img.resize(fit_size(img.size, max_size), RESAMPLE)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        records.append(
            {
                "image": base64.b64encode(buf.getvalue()).decode("ascii"),
                "messages": json.dumps([{"role": "user", "content": "…"}], ensure_ascii=False),
                **{k[5:]: v for k, v in r.items() if k.startswith("data_")},
            }
        )
    pd.DataFrame(records).to_parquet(out)


def _ceiling_one(task: tuple[str, tuple[int, int], int]) -> int:
    path, max_size, quality = task
    with Image.open(path) as img:
        target = fit_size(img.size, max_size)
        img.draft("RGB", target)
        small = img.convert("RGB").resize(target, RESAMPLE)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue())


def ceiling(paths: list[str], max_size: tuple[int, int], quality: int, workers: int) -> None:
    tasks = [(p, max_size, quality) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(_ceiling_one, tasks, chunksize=max(1, len(tasks) // (workers * 8))):
            pass


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=300, help="synthetic images to prepare (default 300)")
    parser.add_argument("--image_size", type=int, nargs=2, default=[4032, 3024], metavar=("W", "H"), help="source size (default 4032 3024)")
    parser.add_argument("--max_image_size", type=int, nargs=2, default=[1024, 1024], metavar=("W", "H"), help="prepared size box (default 1024 1024)")
    parser.add_argument("--image_quality", type=int, default=85, help="JPEG quality (default 85)")
    parser.add_argument("--num_workers", type=int, default=None, help="processes for ours and the ceiling (default: CPU cores)")
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "riskva_bench_prepare"), help="where the synthetic images are cached")
    args = parser.parse_args(argv)
    workers = args.num_workers or _cores()
    max_size, quality = tuple(args.max_image_size), args.image_quality

    data = ensure_dataset(Path(args.cache_dir), args.num_images, tuple(args.image_size))
    csv_path = data / "metadata.csv"
    paths = [str(data / r["image_path"]) for r in _rows(csv_path)]
    n = len(paths)
    for p in paths:  # warm the page cache so no method pays for a cold disk
        Path(p).read_bytes()

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        cfg = PrepareConfig(
            csv_path=str(csv_path), image_base_path=str(data), output_path=str(work / "ours"), format="parquet",
            image_quality=quality, max_image_size=max_size, max_reject_ratio=0.0, num_workers=workers,
        )
        t_ceiling = _timed(ceiling, paths, max_size, quality, workers)
        t_ours = _timed(prepare, cfg)
        t_base = _timed(baseline, csv_path, data, work / "baseline.parquet", max_size, quality)
        ours_bytes = sum((work / "ours" / f"{s}.parquet").stat().st_size for s in ("train", "val", "test"))
        base_bytes = (work / "baseline.parquet").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ips = {"ours": n / t_ours, "baseline": n / t_base, "ceiling": n / t_ceiling}
    vs_base, vs_ceiling, size_ratio = ips["ours"] / ips["baseline"], ips["ours"] / ips["ceiling"], ours_bytes / base_bytes
    print(f"\n{n} images {args.image_size[0]}x{args.image_size[1]} -> fit {max_size[0]}x{max_size[1]}, JPEG q{quality}, {workers} worker(s), {_cores()} core(s)")
    for name in ("ours", "baseline", "ceiling"):
        t = {"ours": t_ours, "baseline": t_base, "ceiling": t_ceiling}[name]
        print(f"  {name:<9} {ips[name]:7.2f} images/s   ({t:6.1f} s)")
    print(f"  ours / baseline  {vs_base:5.2f}x   (target >= 3x)     {'OK' if vs_base >= 3 else 'MISS'}")
    print(f"  ours / ceiling   {vs_ceiling:5.0%}    (target >= 70%)    {'OK' if vs_ceiling >= 0.7 else 'MISS'}")
    print(f"  Parquet size     {ours_bytes / 1e6:.1f} MB vs base64 {base_bytes / 1e6:.1f} MB = {size_ratio:.2f}x (target <= 0.8x) {'OK' if size_ratio <= 0.8 else 'MISS'}")
    print(json.dumps({"images": n, "workers": workers, "images_per_s": {k: round(v, 3) for k, v in ips.items()},
                      "ours_vs_baseline": round(vs_base, 3), "ours_vs_ceiling": round(vs_ceiling, 3), "size_ratio": round(size_ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
