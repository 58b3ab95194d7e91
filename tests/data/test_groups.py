"""Near-duplicate-aware group splits (data/groups.py) through `riskva prepare`."""
from __future__ import annotations

import functools
import io
import json
import logging
from collections import defaultdict

import numpy as np
import pytest
from conftest import build_raw_dataset, row
from image_fixtures import burst

from riskva_core.data import groups as G
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.data.split import split_of
from riskva_core.errors import RiskvaError
from riskva_core.synth.generate import render_image

DEFECTS = 80


def _cfg(ds, out, **kw) -> PrepareConfig:
    kw.setdefault("num_workers", 1)
    kw.setdefault("max_image_size", (128, 128))
    return PrepareConfig(csv_path=ds.csv_path, image_base_path=ds.root, output_path=out, **kw)


@functools.lru_cache(maxsize=None)
def _defect_photos(d: int) -> tuple[tuple[str, bytes], ...]:
    """Defect ``d`` (a riskva_core.synth photo, as bench_groups.py measures) photographed 4 times."""
    from PIL import Image

    return tuple(burst(Image.open(io.BytesIO(render_image(0, d, (512, 384))[0]))))


def _burst_rows(defects: range) -> tuple[list[dict], dict[str, bytes]]:
    rows, images = [], {}
    for d in defects:
        for k, (ext, data) in enumerate(_defect_photos(d)):
            path = f"images/defect{d:03d}_{k}.{ext}"
            images[path] = data
            rows.append(row(d, image_path=path, image_id=f"d{d:03d}_{k}"))  # same labels within a defect
    return rows, images


@pytest.fixture(scope="module")
def bursts(tmp_path_factory):
    rows, images = _burst_rows(range(DEFECTS))
    return build_raw_dataset(tmp_path_factory.mktemp("bursts"), rows, images=images)


def _split_rows(out) -> list[dict]:
    return json.loads((out / "split.json").read_text(encoding="utf-8"))["rows"]


def _straddling(rows: list[dict]) -> list[str]:
    by_defect: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        by_defect[r["image_id"][:4]].add("train" if r["split"] == "train" else "held out")
    return sorted(d for d, s in by_defect.items() if len(s) > 1)


def test_bursts_of_near_duplicates_never_straddle_train_and_val_test(bursts, tmp_path):
    info = prepare(_cfg(bursts, tmp_path / "grouped", val_ratio=0.15, test_ratio=0.15))
    rows = _split_rows(tmp_path / "grouped")
    assert _straddling(rows) == []
    assert len(rows) >= 0.95 * DEFECTS * 4  # kept
    assert info["groups"]["train"] >= 40 and info["groups"]["val"] + info["groups"]["test"] >= 10
    assert info["groups"]["train"] + info["groups"]["val"] + info["groups"]["test"] == DEFECTS  # one group per defect
    assert G.split_leaks(rows, G.DEFAULT_RADIUS) == []
    # Splitting by file bytes alone (split.py's unit) puts many defects on both sides...
    by_bytes = [{**r, "split": split_of(r["image_sha256"], 0.15, 0.15, 42)} for r in rows]
    assert len(_straddling(by_bytes)) > DEFECTS // 4
    # ...and so does radius 0 (identical hashes only), less often: some crop hashes coincide exactly.
    prepare(_cfg(bursts, tmp_path / "exact", val_ratio=0.15, test_ratio=0.15, near_duplicate_radius=0))
    exact = _split_rows(tmp_path / "exact")
    assert _straddling(exact)
    leaks = G.split_leaks(exact, G.DEFAULT_RADIUS)
    assert leaks and {"held_out", "split", "train", "distance"} <= set(leaks[0])  # what the asset check reports
    assert all(0 < leak["distance"] <= G.DEFAULT_RADIUS for leak in leaks)


def test_the_full_frame_hash_alone_misses_crops_the_family_catches():
    """An original against its re-framing (3 % cut from one corner, saved as PNG): the full-frame pHash
    (all split.json held before the families) is often beyond the default radius; the family never."""
    from PIL import Image

    far_full, far_family = [], []
    for d in range(DEFECTS):
        img = Image.open(io.BytesIO(_defect_photos(d)[0][1])).convert("RGB")
        w, h = img.size
        buf = io.BytesIO()
        img.crop((round(w * 0.03), round(h * 0.03), w, h)).save(buf, "PNG")
        original, crop = G.perceptual_hash(img), G.perceptual_hash(Image.open(buf).convert("RGB"))
        assert len(original.split(G.FAMILY_SEP)) == 1 + len(G.CROP_SCALES)
        full = G.family_distance(original.split(G.FAMILY_SEP)[0], crop.split(G.FAMILY_SEP)[0])
        far_full += [d] if full > G.DEFAULT_RADIUS else []
        far_family += [d] if G.family_distance(original, crop) > G.DEFAULT_RADIUS else []
    assert far_family == [] and len(far_full) >= DEFECTS // 10


def test_a_new_version_moves_no_photo_and_keeps_bridging_photos_out(make_raw_dataset, tmp_path):
    v1_rows, v1_images = _burst_rows(range(30))
    for r in v1_rows:
        r["site"] = f"site{r['image_id'][1:4]}"
    v1 = make_raw_dataset(v1_rows, images=v1_images)
    prepare(_cfg(v1, tmp_path / "v1", val_ratio=0.2, test_ratio=0.2, group_column="site"))
    before = {r["image_path"]: r["split"] for r in _split_rows(tmp_path / "v1")}
    train_site = next(p[13:16] for p, s in sorted(before.items()) if s == "train")
    test_defect = next(p[13:16] for p, s in sorted(before.items()) if s == "test")
    new_rows, new_images = _burst_rows(range(30, 60))
    for r in new_rows:
        r["site"] = f"site{r['image_id'][1:4]}"
    # One more photo of a test defect (its first variant, re-encoded again) taken at a train defect's site:
    # it would join a train group to a test group.
    bridge_path = f"images/defect{test_defect}_9.jpg"
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.open(io.BytesIO(v1_images[f"images/defect{test_defect}_0.jpg"])).save(buf, "JPEG", quality=60)
    new_images[bridge_path] = buf.getvalue()
    new_rows.append(row(int(test_defect), image_path=bridge_path, image_id=f"d{test_defect}_9", site=f"site{train_site}"))
    v2 = make_raw_dataset(new_rows + v1_rows, images={**v1_images, **new_images})
    info = prepare(_cfg(v2, tmp_path / "v2", val_ratio=0.2, test_ratio=0.2, group_column="site",
                        previous_split=(str(tmp_path / "v1"),)))
    after = {r["image_path"]: r["split"] for r in _split_rows(tmp_path / "v2")}
    assert {p: after[p] for p in before} == before  # no v1 photo changed split
    split = json.loads((tmp_path / "v2" / "split.json").read_text(encoding="utf-8"))
    assert [e["image_path"] for e in split["excluded"]] == [bridge_path]
    assert "already in different splits (train (4 photos), test (4 photos))" in split["excluded"][0]["reason"]
    assert info["near_duplicates"]["excluded_rows"] == 1 and bridge_path not in after
    assert len(after) == len(v1_rows) + len(new_rows) - 1
    assert G.split_leaks(split["rows"], G.DEFAULT_RADIUS) == []
    with pytest.raises(RiskvaError, match="--group_column nope: no such column in the CSV"):
        prepare(_cfg(v2, tmp_path / "bad", group_column="nope"))


def test_an_earlier_versions_train_photo_anchors_its_near_duplicates_though_gone_from_the_csv(
        make_raw_dataset, tmp_path):
    """v1 holds each defect's original; v2 drops the originals and holds their 3 % crops (another
    file, other bytes). Each crop joins its original's v1 split, where its own draw would differ."""
    v1_rows, images = _burst_rows(range(40))
    originals = [r for r in v1_rows if r["image_id"].endswith("_0")]
    crops = [r for r in v1_rows if r["image_id"].endswith("_3")]
    cfg = dict(val_ratio=0.3, test_ratio=0.3)
    prepare(_cfg(make_raw_dataset(originals, images=images), tmp_path / "v1", **cfg))
    v2 = make_raw_dataset(crops, images=images)
    prepare(_cfg(v2, tmp_path / "v2", previous_split=(str(tmp_path / "v1"),), **cfg))
    prepare(_cfg(v2, tmp_path / "fresh", **cfg))  # the same CSV without history
    before = {r["image_id"][:4]: r["split"] for r in _split_rows(tmp_path / "v1")}
    after = {r["image_id"][:4]: r["split"] for r in _split_rows(tmp_path / "v2")}
    fresh = {r["image_id"][:4]: r["split"] for r in _split_rows(tmp_path / "fresh")}
    assert after == before
    # Without the anchor, some of v1's train defects would come back as val/test photos.
    assert [d for d in before if before[d] == "train" and fresh[d] != "train"]


def test_oversized_groups_and_ratio_drift_are_warned_about(caplog):
    shas = [f"{i:064x}" for i in range(100)]
    sites = [f"site{i}" if i >= 40 else "one big site" for i in range(100)]  # 40 photos in one group
    names = [f"images/{i:03d}.jpg" for i in range(100)]
    with caplog.at_level(logging.WARNING, logger=G.__name__):
        plan = G.plan_splits(shas, [None] * 100, 0.1, 0.1, seed=1, group_keys=sites, names=names)
    big = plan.splits[0]
    assert set(plan.splits[:40]) == {big}
    assert plan.warnings[0].startswith(f"near-duplicate group of 40 photos (over {G.GROUP_WARN_PHOTOS}")
    assert "e.g. images/000.jpg, images/001.jpg, images/002.jpg" in plan.warnings[0]
    share = sum(1 for s in plan.splits if s == big) / 100
    assert any(w.startswith(f"{big} split holds {round(share * 100)} of 100 photos") for w in plan.warnings[1:])
    assert [r.getMessage() for r in caplog.records] == plan.warnings
    # Evenly spread singletons near their ratios: nothing to say.
    even = G.plan_splits([f"{i:064x}" for i in range(3000)], [None] * 3000, 0.1, 0.1, seed=1)
    assert even.warnings == []


def test_grouping_column_keeps_a_site_together():
    shas = [f"{i:064x}" for i in range(200)]
    sites = [f"site{i // 10}" for i in range(200)]  # 20 sites of 10 distinct photos
    plan = G.plan_splits(shas, [None] * 200, 0.2, 0.2, seed=3, group_keys=sites)
    by_site: dict[str, set] = defaultdict(set)
    for site, split in zip(sites, plan.splits):
        by_site[site].add(split)
    assert all(len(s) == 1 for s in by_site.values())
    assert sum(plan.group_counts().values()) == 20 and plan.multi_photo_groups() == 20


def test_the_dagster_assets_default_radius_is_prepares():
    from riskva_assets.data_assets import PrepareAssetConfig

    assert PrepareAssetConfig().near_duplicate_radius == G.DEFAULT_RADIUS


@pytest.mark.parametrize("radius", [0, 3, 10])
def test_neighbour_search_finds_exactly_the_pairs_within_the_radius(radius):
    rng = np.random.default_rng(radius)
    hashes = rng.integers(0, 1 << 24, size=600, dtype=np.uint64)  # clustered low bits: many close pairs
    hashes = np.concatenate([hashes, hashes[:30]])  # and identical ones
    found = {p for a, b in G.near_pairs(hashes, radius) for p in zip(a.tolist(), b.tolist())}
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    want = {(i, j) for i, j in zip(*np.nonzero(dist <= radius)) if i < j}
    assert found == want and len(want) > 0


def test_ungrouped_photos_split_exactly_as_before():
    from riskva_core.data.split import assign_splits

    shas = [f"{i:064x}" for i in range(300)]
    plan = G.plan_splits(shas, [None] * 300, 0.1, 0.1, seed=42)
    assert plan.splits == assign_splits(["轻微"] * 300, shas, 0.1, 0.1, seed=42)


def test_prepare_reuses_the_validation_of_this_data_version_without_decoding(bursts, tmp_path, monkeypatch):
    from riskva_core.data import images, validated
    from riskva_core.data.validate import validate

    folder = tmp_path / "validation"
    spec = images.EncodeSpec((128, 128), 85, str(validated.encoded_dir(folder)))
    validated.encoded_dir(folder).mkdir(parents=True)
    result = validate(bursts.csv_path, bursts.root, output_dir=folder, num_workers=1, encode=spec)
    validated.save(result, folder, images.DEFAULT_MAX_IMAGE_PIXELS, spec)
    fresh = prepare(_cfg(bursts, tmp_path / "fresh"))

    def no_decode(*args, **kwargs):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr("riskva_core.data.validate.inspect_image", no_decode)
    reused = prepare(_cfg(bursts, tmp_path / "reused", validated_dir=str(folder)))
    assert reused == fresh  # same split, groups, byte-identical Parquet files (their hashes are in it)
    js = prepare(_cfg(bursts, tmp_path / "js", format="jsonl", validated_dir=str(folder)))
    assert js["counts"] == fresh["counts"] and len(list((tmp_path / "js" / "images").iterdir())) == sum(js["counts"].values())
    # Other image settings than the saved validation's: validated again (and here, refused to decode).
    with pytest.raises(AssertionError, match="decoded again"):
        prepare(_cfg(bursts, tmp_path / "other", format="jsonl", validated_dir=str(folder), image_quality=70))
