from __future__ import annotations

import random
from collections import Counter

import pytest

from riskva_core.schema import LEVELS
from riskva_core.data.split import assign_splits


def _data(n: int) -> tuple[list[str], list[str]]:
    levels = [LEVELS[i % 3] for i in range(n)]
    groups = [f"sha{i:04d}" for i in range(n)]
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


@pytest.mark.parametrize("n", [20, 24, 31])
def test_every_split_gets_every_level(n):
    levels, groups = _data(n)
    splits = assign_splits(levels, groups, 0.1, 0.1, seed=42)
    for split in ("train", "val", "test"):
        assert {lvl for lvl, s in zip(levels, splits) if s == split} == set(LEVELS)


def test_proportions_follow_the_ratios():
    levels, groups = _data(300)
    counts = Counter(assign_splits(levels, groups, 0.1, 0.2, seed=0))
    assert counts == {"train": 210, "val": 30, "test": 60}


def test_duplicate_images_never_straddle_splits():
    levels, groups = _data(30)
    groups = groups + ["sha0000"] * 3 + ["sha0004"] * 2
    levels = levels + [levels[0]] * 3 + [levels[4]] * 2
    splits = assign_splits(levels, groups, 0.3, 0.3, seed=5)
    by_group: dict[str, set[str]] = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())


def test_zero_ratios_and_tiny_levels():
    levels, groups = _data(9)
    assert set(assign_splits(levels, groups, 0.0, 0.0, seed=1)) == {"train"}
    # One image of a level: it stays in train.
    assert assign_splits(["严重"], ["a"], 0.1, 0.1, seed=1) == ["train"]
    # Two images of a level: train keeps one, the other goes to one held-out split.
    assert sorted(assign_splits(["严重"] * 2, ["a", "b"], 0.1, 0.1, seed=1))[1] == "train"
    assert sorted(assign_splits(["严重"] * 2, ["a", "b"], 0.1, 0.1, seed=1))[0] in {"val", "test"}
