from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from riskva_core import cli
from riskva_core.synth import text as synth_text
from riskva_core.errors import RiskvaError
from riskva_core.schema import CSV_COLUMNS, LEVELS
from riskva_core.synth.generate import (
    DEFECT_TYPES,
    SEVERITY_RULE,
    main,
    plan_image,
    render_image,
    severity_level,
    synth,
)

N = 24
SIZE = (256, 192)
SEED = 3


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same dataset twice: once in-process, once through a 2-process pool."""
    base = tmp_path_factory.mktemp("synth")
    a = synth(base / "a", num_images=N, seed=SEED, image_size=SIZE, num_workers=1)
    b = synth(base / "b", num_images=N, seed=SEED, image_size=SIZE, num_workers=2)
    return a.parent, b.parent


def test_csv_columns_rows_and_text(runs):
    root = runs[0]
    raw = (root / "metadata.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")  # plain UTF-8, as the seed's reader expects
    header = raw.decode("utf-8").splitlines()[0]
    assert header == ",".join(CSV_COLUMNS)
    rows = _rows(root / "metadata.csv")
    assert [r["image_id"] for r in rows] == [str(i) for i in range(N)]
    for r in rows:
        assert r["image_path"] == f"images/{int(r['image_id']):06d}.jpg"
        assert r["data_风险等级"] in LEVELS
        assert 10 <= len(r["data_缺陷描述"]) <= 25, r["data_缺陷描述"]
        assert all(r[c].strip() for c in CSV_COLUMNS)


def test_images_exist_decode_and_carry_no_exif(runs):
    root = runs[0]
    files = sorted((root / "images").iterdir())
    assert len(files) == N
    for path in files:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == SIZE and im.mode == "RGB"
            assert not im.getexif()
            im.load()
    # No leftover temporary files from the atomic writes.
    assert not [p for p in root.rglob(".*")]


def test_parallel_and_serial_runs_are_byte_identical(runs):
    a, b = runs
    da, db = _digests(a), _digests(b)
    assert len(da) == N + 2  # images + metadata.csv + synth_manifest.json
    assert da == db


def test_different_seed_gives_different_data(runs, tmp_path):
    other = synth(tmp_path / "c", num_images=4, seed=SEED + 1, image_size=SIZE, num_workers=1).parent
    same = _digests(runs[0])
    diff = _digests(other)
    assert all(diff[f"images/{i:06d}.jpg"] != same[f"images/{i:06d}.jpg"] for i in range(4))


def test_image_text_depends_only_on_seed_and_index(runs):
    rows = _rows(runs[0] / "metadata.csv")
    manifest = json.loads((runs[0] / "synth_manifest.json").read_text(encoding="utf-8"))
    for i in (0, 7, N - 1):
        data, record = render_image(SEED, i, SIZE)  # rendered alone, outside any dataset
        assert hashlib.sha256(data).digest() == hashlib.sha256(
            (runs[0] / rows[i]["image_path"]).read_bytes()).digest()
        for field in ("风险", "纠正和预防建议", "风险等级", "缺陷描述"):
            assert rows[i][f"data_{field}"] == record[field]
    for r, m in zip(rows, manifest["images"]):
        # 缺陷描述 follows from what is visible: type, level and surface.
        surface_word = synth_text.SURFACE_WORDS[m["surface"]]
        expected = synth_text.DESCRIPTIONS[m["defect_type"]][m["level"]].format(surface=surface_word)
        assert r["data_缺陷描述"] == expected
        assert r["data_风险"].startswith(m["location"])
        assert m["location"] in synth_text.LOCATIONS[m["defect_type"]][m["surface"]]


def test_manifest_levels_follow_the_severity_rule(runs):
    manifest = json.loads((runs[0] / "synth_manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == SEED and manifest["image_size"] == list(SIZE)
    rows = {r["image_id"]: r for r in _rows(runs[0] / "metadata.csv")}
    for m in manifest["images"]:
        assert severity_level(m["defect_type"], m["measurements"]) == m["level"]
        assert rows[m["image_id"]]["data_风险等级"] == m["level"]


def test_every_type_and_level_is_drawn_as_planned_with_clear_margins():
    """Render one image per (type, level): the measured severity must land on the planned
    level, and continuous measurements must stay well clear of the rule's thresholds."""
    wanted: dict[tuple[str, str], int] = {}
    for i in range(2000):
        plan = plan_image(0, i)
        wanted.setdefault((plan["defect_type"], plan["level"]), i)
        if len(wanted) == len(DEFECT_TYPES) * len(LEVELS):
            break
    assert len(wanted) == len(DEFECT_TYPES) * len(LEVELS)
    for (dtype, level), i in sorted(wanted.items()):
        _, record = render_image(0, i, SIZE)
        assert record["defect_type"] == dtype
        assert record["风险等级"] == level, (dtype, level, record["measurements"])
        for name, (mid, high) in SEVERITY_RULE[dtype].items():
            value = record["measurements"][name]
            if isinstance(value, float):
                assert min(abs(value - mid) / mid, abs(value - high) / high) > 0.1, (dtype, name, value)


def test_missing_tiles_mark_only_the_severe_level():
    """Missing tiles are the cue a 24-token view reads best, so they must separate the levels:
    none below 严重, at least three at 严重 (generator v3)."""
    seen: dict[str, list[int]] = {lvl: [] for lvl in LEVELS}
    for i in range(600):
        plan = plan_image(0, i)
        if plan["defect_type"] != "tile" or len(seen[plan["level"]]) >= 2:
            continue
        seen[plan["level"]].append(render_image(0, i, SIZE)[1]["measurements"]["missing_tiles"])
    assert all(len(v) == 2 for v in seen.values()), seen
    assert seen["轻微"] == [0, 0] and seen["中等"] == [0, 0], seen
    assert min(seen["严重"]) >= 3, seen


def test_type_and_level_mix_is_mildly_imbalanced():
    plans = [plan_image(0, i) for i in range(3000)]
    levels = collections.Counter(p["level"] for p in plans)
    types = collections.Counter(p["defect_type"] for p in plans)
    assert set(types) == set(DEFECT_TYPES)
    share = [levels[lvl] / len(plans) for lvl in LEVELS]
    assert share[0] > share[1] > share[2] > 0.12
    assert abs(share[0] - 0.45) < 0.04 and abs(share[2] - 0.20) < 0.04
    assert max(types.values()) > 1.5 * min(types.values())
    # A moderate dataset already covers every type and level.
    first = plans[:120]
    assert {p["defect_type"] for p in first} == set(DEFECT_TYPES)
    assert {p["level"] for p in first} == set(LEVELS)


def test_severity_rule_takes_the_worst_measurement():
    assert severity_level("crack", {"length_ratio": 0.3, "width_ratio": 0.004}) == "轻微"
    assert severity_level("crack", {"length_ratio": 0.3, "width_ratio": 0.02}) == "严重"
    assert severity_level("crack", {"length_ratio": 1.0, "width_ratio": 0.004}) == "中等"
    assert severity_level("spalling", {"area_fraction": 0.03, "rebar_count": 4}) == "严重"
    assert severity_level("tile", {"broken_tiles": 1}) == "轻微"
    assert severity_level("tile", {"broken_tiles": 2}) == "中等"
    assert severity_level("mould", {"area_fraction": 0.20}) == "严重"


def test_phone_sized_image_is_rendered_upscaled():
    data, record = render_image(0, 0, (4032, 3024))
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (4032, 3024)
    assert record["风险等级"] == severity_level(record["defect_type"], record["measurements"])


@pytest.mark.parametrize("argv, flag", [
    (["--num_images", "0"], "--num_images"),
    (["--image_size", "32", "200"], "--image_size"),
    (["--seed", "-1"], "--seed"),
    (["--num_workers", "0"], "--num_workers"),
])
def test_bad_flags_raise_one_line_errors(tmp_path, capsys, argv, flag):
    with pytest.raises(RiskvaError, match=flag):
        main(["--output_path", str(tmp_path / "x"), *argv])
    assert cli.main(["synth", "--output_path", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_refuses_foreign_folder_and_replaces_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RiskvaError, match="--output_path"):
        synth(foreign, num_images=1, image_size=(64, 64))
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "ds"
    assert main(["--output_path", str(out), "--num_images", "3", "--image_size", "96", "64"]) == 0
    synth(out, num_images=1, image_size=(96, 64), num_workers=1)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.jpg"]
    assert len(_rows(out / "metadata.csv")) == 1
