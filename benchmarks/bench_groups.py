"""Near-duplicate grouping (riskva_core/data/groups.py): what the default radius catches and merges.

Bursts: ``--defects`` synthetic defect photos (riskva_core.synth, seed 0) each photographed 4
times as tests/image_fixtures.burst makes them (re-encoded JPEG q75, 90 % size, +8 % brightness,
a centred 3 % crop saved as PNG). Distinct: ``--distinct`` other synthetic photos (seed 1), no
two of the same scene. Every photo is decoded and fitted as ``prepare`` does (decode_fitted to
1024 px) before hashing, so the hashes are the ones prepare records.

For the full-frame pHash alone and for the hash family (full frame + central crops), at each radius:

  split apart   defects whose 4 photos do not form one group (any of them can straddle splits);
  straddling    defects with photos in train AND val/test after plan_splits (val 0.15, test 0.15,
                over ``--seeds`` split seeds, total)
  grouped       distinct photos put in a group with another distinct photo (false merges), in %,
                and the largest such group
  off-centre    defects whose crop of 3 % / 5 % from one corner is not linked to its original

and the time to hash one photo and to group ``--scale`` photos (random hash families, the
multi-index search's worst realistic case at that size).

    .venv/bin/python benchmarks/bench_groups.py                       # 80 defects, 1500 distinct
    .venv/bin/python benchmarks/bench_groups.py --distinct 300        # quicker
Rendered photos are cached under --cache_dir.
"""
from __future__ import annotations

import argparse
import io
import logging
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from image_fixtures import burst  # noqa: E402

from riskva_core.data import groups as G  # noqa: E402
from riskva_core.data.images import decode_fitted  # noqa: E402
from riskva_core.synth.generate import render_image  # noqa: E402

PREPARE_SIDE = (1024, 1024)  # prepare's default --max_image_size


def _render(task: tuple[int, int, tuple[int, int]]) -> bytes:
    return render_image(*task)[0]


def _rendered(cache: Path, seed: int, n: int, size: tuple[int, int], workers: int) -> list[bytes]:
    path = cache / f"synth_s{seed}_n{n}_{size[0]}x{size[1]}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    with ProcessPoolExecutor(workers) as pool:
        out = list(pool.map(_render, [(seed, i, size) for i in range(n)], chunksize=8))
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out))
    return out


def _hash(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return G.perceptual_hash(decode_fitted(img, PREPARE_SIDE))


def _off_centre(data: bytes, frac: float) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    buf = io.BytesIO()
    img.crop((round(w * frac), round(h * frac), w, h)).save(buf, "PNG")
    return buf.getvalue()


def _full_only(families: list[str]) -> list[str]:
    return [f.split(G.FAMILY_SEP)[0] for f in families]


def _measure(label: str, bursts: list[str], n_defects: int, distinct: list[str], off: dict[str, list[tuple[str, str]]],
             radius: int, seeds: int) -> dict[str, object]:
    shas = [f"{i:064x}" for i in range(len(bursts))]
    plan = G.plan_splits(shas, bursts, 0.15, 0.15, seed=0, radius=radius)
    apart = sum(1 for d in range(n_defects) if len(set(plan.groups[4 * d:4 * d + 4])) > 1)
    straddling = 0
    for seed in range(seeds):
        splits = G.plan_splits(shas, bursts, 0.15, 0.15, seed=seed, radius=radius).splits
        straddling += sum(1 for d in range(n_defects)
                          if len({s == "train" for s in splits[4 * d:4 * d + 4]}) > 1)
    dplan = G.plan_splits([f"{i:064x}" for i in range(len(distinct))], distinct, 0.15, 0.15, seed=0, radius=radius)
    sizes = np.bincount(dplan.groups)
    grouped = float((sizes[dplan.groups] > 1).mean())
    missed = {k: sum(1 for a, b in pairs if G.family_distance(a, b) > radius) for k, pairs in off.items()}
    return {"hashes": label, "radius": radius, "split_apart": apart, "straddling": straddling,
            "grouped_pct": round(100 * grouped, 2), "largest_false_group": int(sizes.max()), "off_centre_missed": missed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--defects", type=int, default=80)
    ap.add_argument("--distinct", type=int, default=1500)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 384))
    ap.add_argument("--seeds", type=int, default=20, help="split seeds the straddling count is summed over")
    ap.add_argument("--radii", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    ap.add_argument("--scale", type=int, default=5000, help="photos for the grouping-time figure")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache_dir", type=Path, default=ROOT / ".bench_cache")
    args = ap.parse_args()
    size = tuple(args.size)
    logging.getLogger(G.__name__).setLevel(logging.ERROR)  # ratio-drift warnings of the test plans

    originals = _rendered(args.cache_dir, 0, args.defects, size, args.workers)
    others = _rendered(args.cache_dir, 1, args.distinct, size, args.workers)
    photos = [b for data in originals for _, b in burst(Image.open(io.BytesIO(data)))]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        bursts = list(pool.map(_hash, photos, chunksize=16))
        distinct = list(pool.map(_hash, others, chunksize=16))
        originals_h = [bursts[4 * d] for d in range(args.defects)]  # the re-encoded original
        off = {f"{int(f * 100)}%": list(zip(originals_h, pool.map(_hash, [_off_centre(d, f) for d in originals])))
               for f in (0.03, 0.05)}
    per_photo = (time.perf_counter() - t0) * args.workers / (len(photos) + len(others) + 2 * args.defects)

    rows = []
    for radius in args.radii:
        rows.append(_measure("full frame", _full_only(bursts), args.defects, _full_only(distinct),
                             {k: [(a.split(G.FAMILY_SEP)[0], b.split(G.FAMILY_SEP)[0]) for a, b in v]
                              for k, v in off.items()}, radius, args.seeds))
        rows.append(_measure("family", bursts, args.defects, distinct, off, radius, args.seeds))
    print(f"{args.defects} defects x 4 photos, {args.distinct} distinct photos, {size[0]}x{size[1]}, "
          f"straddling summed over {args.seeds} split seeds; hashing {per_photo * 1000:.1f} ms/photo/core "
          f"(decode + fit + {1 + len(G.CROP_SCALES)} pHashes)")
    print(f"{'hashes':<11} {'radius':>6} {'apart':>6} {'straddle':>8} {'grouped %':>9} {'largest':>7}  off-centre missed")
    for r in sorted(rows, key=lambda r: (r["hashes"], r["radius"])):
        print(f"{r['hashes']:<11} {r['radius']:>6} {r['split_apart']:>6} {r['straddling']:>8} {r['grouped_pct']:>9} "
              f"{r['largest_false_group']:>7}  {r['off_centre_missed']}")

    rng = np.random.default_rng(0)
    fams = [G.FAMILY_SEP.join(f"{int(x):016x}" for x in rng.integers(0, 2**63, size=1 + len(G.CROP_SCALES)))
            for _ in range(args.scale)]
    t0 = time.perf_counter()
    G.plan_splits([f"{i:064x}" for i in range(args.scale)], fams, 0.15, 0.15, seed=0)
    print(f"plan_splits on {args.scale} photos (random families, radius {G.DEFAULT_RADIUS}): "
          f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
