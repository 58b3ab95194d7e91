"""Deterministic train/val/test split, stratified by 风险等级 and grouped by image content.

- Grouped: rows whose images have the same content hash are one unit, so a duplicated
  photo never sits in both train and test (that would inflate test scores).
- Stratified: each level is split on its own, so every split sees every level.
- Stable across machines and Python versions: units are ordered by
  sha256(f"{seed}:{group_key}"), never by Python's salted ``hash()`` or by input order.
- Small levels: when a level has enough units, each split with a non-zero ratio gets
  at least one of them, and train always keeps at least one.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from riskva_core.data.samples import SPLITS


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode("utf-8")).hexdigest()


def _allocate(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """(n_val, n_test) units out of ``n`` for one level."""
    n_val = round(n * val_ratio)
    n_test = round(n * test_ratio)
    while n_val + n_test > max(n - 1, 0):  # train keeps at least one unit
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    # One unit per held-out split when the level can afford it; test first, since
    # evaluating every level matters more than early-stopping on it.
    if test_ratio > 0 and n_test == 0 and n - 1 - n_val >= 1:
        n_test = 1
    if val_ratio > 0 and n_val == 0 and n - 1 - n_test >= 1:
        n_val = 1
    return n_val, n_test


def assign_splits(
    levels: Sequence[str], groups: Sequence[str], val_ratio: float, test_ratio: float, seed: int
) -> list[str]:
    """Split name for each row. ``groups[i]`` is row i's group key (its image content hash).

    Rows of one group must share a level (conflicting labels are rejected by validation);
    a group's level is taken from its first row.
    """
    if len(levels) != len(groups):
        raise ValueError("levels and groups must have the same length")
    group_level: dict[str, str] = {}
    for level, group in zip(levels, groups):
        group_level.setdefault(group, level)
    by_level: dict[str, list[str]] = {}
    for group, level in group_level.items():
        by_level.setdefault(level, []).append(group)
    group_split: dict[str, str] = {}
    for level in sorted(by_level):
        units = sorted(by_level[level], key=lambda g: _order_key(seed, g))
        n_val, n_test = _allocate(len(units), val_ratio, test_ratio)
        for i, group in enumerate(units):
            group_split[group] = SPLITS[2] if i < n_test else SPLITS[1] if i < n_test + n_val else SPLITS[0]
    return [group_split[g] for g in groups]
