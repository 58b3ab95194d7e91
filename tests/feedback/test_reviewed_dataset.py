from __future__ import annotations

import csv
import hashlib
import io
import json

import pytest

from conftest import build_raw_dataset, image_bytes, textured_image
from riskva_core.data.validate import validate
from riskva_core.errors import RiskvaError
from riskva_core.feedback.reviewed_dataset import PROVENANCE, ReviewedDatasetConfig, write_reviewed_dataset
from riskva_core.feedback.reviews import Review

DRAFT = {"风险": "墙面开裂，存在渗水隐患", "风险等级": "中等", "纠正和预防建议": "建议修补。", "缺陷描述": "墙面竖向裂缝"}


def review(photo, fields=None, at="2025-03-04T10:00:00Z", reviewer="li@site.cn") -> Review:
    data = photo.read_bytes()
    return Review(photo_sha256=hashlib.sha256(data).hexdigest(), photo_path=str(photo), fields=fields or dict(DRAFT),
                  draft=dict(DRAFT), model_version="3", reviewer=reviewer, reviewed_at=at, task_id=1, trace_id="tr-1")


@pytest.fixture
def earlier(tmp_path):
    return build_raw_dataset(tmp_path / "v1", 6)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "field"
    folder.mkdir()
    out = []
    for i in range(50, 54):
        p = folder / f"{i}.jpg"
        p.write_bytes(image_bytes(textured_image(i, (64, 48)), "JPEG", quality=90))
        out.append(p)
    return out


def test_the_new_version_holds_the_earlier_rows_and_the_reviewed_photos_and_validates(earlier, photos, tmp_path):
    corrected = dict(DRAFT, 风险等级="严重", 缺陷描述="墙面竖向裂缝，宽约3mm")
    duplicate = tmp_path / "dup.jpg"
    duplicate.write_bytes((earlier.root / earlier.rows[0]["image_path"]).read_bytes())  # already in v1
    reviews = [review(photos[0]),  # accepted unchanged
               review(photos[1], corrected, at="2025-03-04T11:00:00Z"),
               review(photos[1], dict(DRAFT, 风险等级="轻微"), at="2025-03-04T09:00:00Z"),  # superseded by the later one
               review(photos[2], dict(DRAFT, 风险=" ")),  # incomplete
               review(duplicate)]
    result = write_reviewed_dataset(ReviewedDatasetConfig(earlier.csv_path, earlier.root, reviews, tmp_path / "v2"))
    assert (result.rows_previous, result.rows_added) == (6, 2)
    assert result.changed == {"风险": 0, "风险等级": 1, "纠正和预防建议": 0, "缺陷描述": 1}
    reasons = sorted(s["reason"] for s in result.skipped)
    assert reasons[0].startswith("incomplete review: 风险 empty") and reasons[1].startswith("the same photo is already")

    report = validate(result.csv_path, result.path, output_dir=tmp_path / "validation").report
    assert report["passed"] and report["rows_valid"] == 8 and report["rows_rejected"] == 0
    assert report["csv_path"] == str(result.csv_path.resolve())
    text = result.csv_path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "image_id,image_path,data_风险,data_纠正和预防建议,data_风险等级,data_缺陷描述"
    rows = {r["image_id"]: r for r in csv.DictReader(io.StringIO(text))}
    row = rows[f"field-{reviews[1].photo_sha256[:16]}"]  # the later of its two reviews stands
    assert (row["data_风险等级"], row["data_缺陷描述"]) == ("严重", "墙面竖向裂缝，宽约3mm")
    assert rows[f"field-{reviews[0].photo_sha256[:16]}"]["data_风险等级"] == "中等"

    provenance = json.loads((result.path / PROVENANCE).read_text(encoding="utf-8"))
    by_sha = {r["photo_sha256"]: r for r in provenance["reviews"]}
    changed = by_sha[reviews[1].photo_sha256]
    assert changed["changed_fields"] == ["风险等级", "缺陷描述"] and changed["draft"] == DRAFT
    assert changed["reviewer"] == "li@site.cn" and changed["reviewed_at"] == "2025-03-04T11:00:00Z"
    assert by_sha[reviews[0].photo_sha256]["changed_fields"] == [] and changed["model_version"] == "3"
    assert (result.path / changed["image_path"]).read_bytes() == photos[1].read_bytes()


def test_too_few_reviews_or_an_existing_version_write_nothing(earlier, photos, tmp_path):
    with pytest.raises(RiskvaError, match="fewer than the 3"):
        write_reviewed_dataset(ReviewedDatasetConfig(earlier.csv_path, earlier.root, [review(photos[0])],
                                                     tmp_path / "v2", min_reviews=3))
    assert not (tmp_path / "v2").exists() and not list(tmp_path.glob(".v2*"))
    (tmp_path / "v3").mkdir()
    with pytest.raises(RiskvaError, match="never overwritten"):
        write_reviewed_dataset(ReviewedDatasetConfig(earlier.csv_path, earlier.root, [review(photos[0])], tmp_path / "v3"))
