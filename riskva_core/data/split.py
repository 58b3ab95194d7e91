"""Deterministic train/val/test split that follows the image, not the dataset version.

Each image (its content hash) is placed by a seeded hash of that content alone:
``u = sha256(f"{seed}:{image_sha256}")`` read as a number in [0, 1); ``u < test_ratio``
→ test, ``u < test_ratio + val_ratio`` → val, else train. Why per image and not by ranking
inside a version: when a version grows (v2 = v1 + new photos), a ranking reshuffles and
images v1 trained on land in v2's test split, so the champion is scored on its own
training images. With a per-image draw, an image keeps its split in every version that
contains it (given the same seed and ratios), and new photos only add to each split.

- Grouped: rows with the same content hash are one unit, so a duplicated photo never
  sits in both train and test.
- Stable across machines and Python versions: sha256, never Python's salted ``hash()``,
  never input order.
- Stratified only in expectation: each level is split with the same ratios, but small
  levels can miss a held-out split. ``level_counts`` reports what each split got (the
  prepared folder's dataset_info.json and the Dagster metadata show it).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

from riskva_core.data.samples import SPLITS

_SCALE = float(1 << 64)


def unit_draw(seed: int, group: str) -> float:
    """The image's seeded position in [0, 1): a pure function of (seed, content hash)."""
    return int(hashlib.sha256(f"{seed}:{group}".encode("utf-8")).hexdigest()[:16], 16) / _SCALE


def split_of(group: str, val_ratio: float, test_ratio: float, seed: int) -> str:
    if not (0.0 <= val_ratio < 1.0 and 0.0 <= test_ratio < 1.0 and val_ratio + test_ratio < 1.0):
        raise ValueError(f"split ratios val={val_ratio}, test={test_ratio}: each in [0, 1) and together below 1")
    u = unit_draw(seed, group)
    return SPLITS[2] if u < test_ratio else SPLITS[1] if u < test_ratio + val_ratio else SPLITS[0]


def assign_splits(
    levels: Sequence[str], groups: Sequence[str], val_ratio: float, test_ratio: float, seed: int
) -> list[str]:
    """Split name for each row. ``groups[i]`` is row i's group key (its image content hash).

    ``levels`` is checked for length only: the split no longer depends on the level (see the
    module docstring); it is kept in the signature so callers report per-level counts.
    """
    if len(levels) != len(groups):
        raise ValueError("levels and groups must have the same length")
    cache: dict[str, str] = {}
    return [cache.setdefault(g, split_of(g, val_ratio, test_ratio, seed)) for g in groups]


def level_counts(levels: Sequence[str], splits: Sequence[str]) -> dict[str, dict[str, int]]:
    """Rows per split and level, e.g. ``{"test": {"严重": 3, ...}, ...}``: how close stratification came."""
    counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for level, split in zip(levels, splits):
        counts[split][level] += 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}
