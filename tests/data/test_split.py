from __future__ import annotations

import random
from collections import Counter

from riskva_core.schema import LEVELS
from riskva_core.data.split import assign_splits, level_counts


def _data(n: int, start: int = 0) -> tuple[list[str], list[str]]:
    levels = [LEVELS[i % 3] for i in range(start, start + n)]
    groups = [f"sha{i:04d}" for i in range(start, start + n)]
    return levels, groups


def test_deterministic_and_seed_dependent():
    levels, groups = _data(60)
    a = assign_splits(levels, groups, 0.1, 0.1, seed=42)
    assert a == assign_splits(levels, groups, 0.1, 0.1, seed=42)
    assert a != assign_splits(levels, groups, 0.1, 0.1, seed=7)


def test_independent_of_input_order():
    levels, groups = _data(40)
    a = dict(zip(groups, assign_splits(levels, groups, 0.2, 0.1, seed=1)))
    order = list(range(40))
    random.Random(3).shuffle(order)
    b = dict(zip([groups[i] for i in order], assign_splits([levels[i] for i in order], [groups[i] for i in order], 0.2, 0.1, seed=1)))
    assert a == b


def test_a_grown_version_keeps_every_image_in_its_split():
    """v2 = v1 + new photos (in any order): no v1 train/val image lands in v2's test split."""
    levels1, groups1 = _data(200)
    v1 = dict(zip(groups1, assign_splits(levels1, groups1, 0.1, 0.1, seed=42)))
    levels_new, groups_new = _data(300, start=200)
    levels2, groups2 = levels_new + levels1, groups_new + groups1
    v2 = dict(zip(groups2, assign_splits(levels2, groups2, 0.1, 0.1, seed=42)))
    assert {g: v2[g] for g in groups1} == v1
    leaked = [g for g in groups1 if v1[g] in ("train", "val") and v2[g] == "test"]
    assert leaked == [] and Counter(v2.values())["test"] > Counter(v1.values())["test"]


def test_proportions_follow_the_ratios_and_levels_are_reported():
    levels, groups = _data(3000)
    splits = assign_splits(levels, groups, 0.1, 0.2, seed=0)
    counts = Counter(splits)
    assert abs(counts["val"] / 3000 - 0.1) < 0.02 and abs(counts["test"] / 3000 - 0.2) < 0.02
    per_level = level_counts(levels, splits)
    assert sum(sum(c.values()) for c in per_level.values()) == 3000
    for split, ratio in (("val", 0.1), ("test", 0.2)):  # stratified in expectation
        assert all(abs(per_level[split][lvl] / 1000 - ratio) < 0.04 for lvl in LEVELS)


def test_duplicate_images_never_straddle_splits():
    levels, groups = _data(30)
    groups = groups + ["sha0000"] * 3 + ["sha0004"] * 2
    levels = levels + [levels[0]] * 3 + [levels[4]] * 2
    splits = assign_splits(levels, groups, 0.3, 0.3, seed=5)
    by_group: dict[str, set[str]] = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())


def test_zero_ratios_keep_everything_in_train():
    levels, groups = _data(9)
    assert set(assign_splits(levels, groups, 0.0, 0.0, seed=1)) == {"train"}
