from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import image_bytes, row, textured_image, write_csv
from riskva_core import cli
from riskva_core.errors import RiskvaError
from riskva_core.data.raw_csv import normalise_frame, normalise_prose
from riskva_core.data.validate import REPORT_JSON, REPORT_MD, schema_failures, validate

LEVEL = "data_风险等级"


def _reasons(result) -> dict[int, list[str]]:
    return {r["row"]: r["reasons"] for r in result.report["rejected"]}


def _valid_rows(result) -> list[int]:
    return [r.row for r in result.records]


# --------------------------------------------------------------------------- normalisers and schema


@pytest.mark.parametrize(
    "before, after",
    [(" 严重 ", "严重"), ("嚴重", "严重"), ("輕微", "轻微"), ("\u3000中等\u3000", "中等"), ("严 重", "严重")],
)
def test_unambiguous_level_variants_are_normalised_and_recorded(before, after):
    df = pd.DataFrame([row(0, level=before)])
    out, changes = normalise_frame(df)
    assert out.at[0, LEVEL] == after
    assert changes == [{"row": 0, "column": LEVEL, "before": before, "after": after}]
    assert schema_failures(out) == {}


@pytest.mark.parametrize("level", ["较严重", "高", "严重/中等", ""])
def test_ambiguous_levels_are_rejected_not_guessed(level):
    out, _ = normalise_frame(pd.DataFrame([row(0, level=level)]))
    assert schema_failures(out) == {0: [f"data_风险等级 {level!r} is not one of 轻微/中等/严重"]}


def test_prose_keeps_cjk_punctuation_but_fixes_fullwidth_alnum():
    assert normalise_prose("  裂缝宽约２ｍｍ，需修补。 ") == "裂缝宽约2mm，需修补。"


def test_control_characters_never_reach_the_fields(make_raw_dataset):
    """NUL, BEL, ESC, zero-width and BOM characters are removed (and listed); a cell that was
    nothing but control characters is empty, hence rejected with a reason."""
    rows = [row(0, **{"data_风险": "墙面\x00开裂\u200b，存在\x07渗水\x1b隐患\ufeff", "data_缺陷描述": "裂缝\r\n宽约2mm\t"}),
            row(1, **{"data_纠正和预防建议": "\x00\x00"}), row(2)]
    ds = make_raw_dataset(rows)
    result = validate(ds.csv_path, ds.root)
    (rec,) = [r for r in result.records if r.row == 0]
    assert rec.fields["风险"] == "墙面开裂，存在渗水隐患" and rec.fields["缺陷描述"] == "裂缝\n宽约2mm"
    assert _reasons(result) == {1: ["data_纠正和预防建议 is empty"]}
    assert {(c["row"], c["column"]) for c in result.report["normalised"]} >= {(0, "data_风险"), (1, "data_纠正和预防建议")}
    assert not any(ch in json.dumps([r.fields for r in result.records]) for ch in ("\\u0000", "\\u200b", "\\u001b"))


def test_empty_cells_each_give_a_reason():
    out, _ = normalise_frame(pd.DataFrame([row(0, **{"data_风险": "  ", "data_缺陷描述": ""}), row(1)]))
    assert schema_failures(out) == {0: ["data_风险 is empty", "data_缺陷描述 is empty"]}


def test_image_id_synthesised_when_missing_or_empty():
    df = pd.DataFrame([{k: v for k, v in row(i).items() if k != "image_id"} for i in range(2)])
    out, changes = normalise_frame(df)
    assert out["image_id"].tolist() == ["0", "1"] and changes == []
    out, changes = normalise_frame(pd.DataFrame([row(0), row(1, image_id=" ")]))
    assert out["image_id"].tolist() == ["img0000", "1"]
    assert changes == [{"row": 1, "column": "image_id", "before": " ", "after": "1"}]


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("encoding, expected", [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gbk", "gb18030"), ("gb18030", "gb18030")])
def test_csv_encodings(make_raw_dataset, encoding, expected):
    ds = make_raw_dataset(3, encoding=encoding)
    result = validate(ds.csv_path, ds.root, num_workers=1)
    assert result.report["encoding"] == expected
    assert [r.fields["风险"] for r in result.records] == [r["data_风险"] for r in ds.rows]


def test_extra_columns_pass_through(make_raw_dataset):
    ds = make_raw_dataset([row(0, 位置信息="3号楼2层"), row(1, 位置信息="")])
    result = validate(ds.csv_path, ds.root, num_workers=1)
    assert [r.extra for r in result.records] == [{"位置信息": "3号楼2层"}, {"位置信息": ""}]
    assert result.report["extra_columns"] == ["位置信息"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty CSV"),
        (b"  \n", "empty CSV"),
        ("image_id,image_path,data_风险,data_纠正和预防建议,data_风险等级,data_缺陷描述\n".encode(), "no data rows"),
        ("image_id,image_path,data_风险\n0,a.jpg,x\n".encode(), "missing required column(s) data_纠正和预防建议, data_风险等级, data_缺陷描述"),
        (b"image_path\n\x80\xff\xfe\n", "cannot decode the CSV (tried utf-8, gb18030); save it as UTF-8"),
    ],
)
def test_unusable_csv_raises_exit_2(tmp_path, content, message):
    csv_path = tmp_path / "data.csv"
    csv_path.write_bytes(content)
    with pytest.raises(RiskvaError) as err:
        validate(csv_path, tmp_path)
    assert err.value.exit_code == 2 and message in str(err.value)


def test_missing_csv_and_bad_base(tmp_path, make_raw_dataset):
    with pytest.raises(RiskvaError, match="no such file"):
        validate(tmp_path / "nope.csv", tmp_path)
    ds = make_raw_dataset(1)
    with pytest.raises(RiskvaError, match="not a folder"):
        validate(ds.csv_path, tmp_path / "nowhere")


# --------------------------------------------------------------------------- duplicates and conflicts


def test_exact_repeat_keeps_the_first(make_raw_dataset):
    ds = make_raw_dataset([row(0), row(1), row(0, image_id="other"), row(0, image_path="./images/0000.jpg")])
    result = validate(ds.csv_path, ds.root, num_workers=1)
    assert _reasons(result) == {2: ["duplicate of row 0"], 3: ["duplicate of row 0"]}
    assert _valid_rows(result) == [0, 1]


def test_conflicting_labels_for_one_path_reject_all(make_raw_dataset):
    ds = make_raw_dataset([row(0), row(1), row(0, level="严重" if row(0)[LEVEL] != "严重" else "轻微"), row(0)])
    result = validate(ds.csv_path, ds.root, max_reject_ratio=1.0, num_workers=1)
    assert _reasons(result) == {
        0: ["conflicting labels: same image_path as row 2 with different fields"],
        2: ["conflicting labels: same image_path as rows 0, 3 with different fields"],
        3: ["conflicting labels: same image_path as row 2 with different fields"],
    }
    assert _valid_rows(result) == [1]


def test_same_image_content_under_conflicting_labels(make_raw_dataset):
    same = image_bytes(textured_image(9))
    rows = [row(0), row(1, image_path="images/copy.jpg", **{"data_风险": row(0)["data_风险"]}), row(2), row(3, image_path="images/copy2.jpg")]
    rows[1].update({k: v for k, v in row(0).items() if k.startswith("data_")})  # same fields as row 0
    ds = make_raw_dataset(rows, images={"images/0000.jpg": same, "images/copy.jpg": same, "images/copy2.jpg": same})
    result = validate(ds.csv_path, ds.root, max_reject_ratio=1.0, num_workers=1)
    assert _reasons(result) == {
        0: ["conflicting labels: same image content as row 3 with different fields"],
        1: ["conflicting labels: same image content as row 3 with different fields"],
        3: ["conflicting labels: same image content as rows 0, 1 with different fields"],
    }
    assert _valid_rows(result) == [2]


def test_same_content_same_labels_is_kept_with_a_warning(make_raw_dataset):
    same = image_bytes(textured_image(9))
    rows = [row(0), row(0, image_path="images/copy.jpg", image_id="c")]
    ds = make_raw_dataset(rows, images={"images/0000.jpg": same, "images/copy.jpg": same})
    result = validate(ds.csv_path, ds.root, num_workers=1)
    assert _valid_rows(result) == [0, 1]
    assert result.records[0].image_sha256 == result.records[1].image_sha256
    assert result.report["warnings"] == [
        {"row": 1, "image_path": "images/copy.jpg", "warning": "same image content as row 0 (same fields); kept, never split apart"}
    ]


# --------------------------------------------------------------------------- the hostile-input suite


def _hostile(make_raw_dataset):
    cmyk = Image.new("CMYK", (40, 30), (10, 200, 30, 0))
    sixteen = Image.fromarray(np.asarray(textured_image(20).convert("L")).astype(np.uint16) * 257)
    palette = textured_image(21).convert("RGBA").convert("P")
    good = image_bytes(textured_image(22, (60, 40)))
    rows = [
        row(0),  # 0 valid
        row(1, image_path="../outside.jpg"),  # 1
        row(2, image_path="/etc/hosts"),  # 2
        row(3, image_path="https://example.com/a.jpg"),  # 3
        row(4, image_path="images/missing.jpg"),  # 4
        row(5, image_path="images/truncated.jpg"),  # 5
        row(6, image_path="images/zero.jpg"),  # 6
        row(7, image_path="images/jpeg_named.png"),  # 7 valid, warning
        row(8, image_path="images/cmyk.jpg"),  # 8 valid
        row(9, image_path="images/sixteen.png"),  # 9 valid
        row(10, image_path="images/palette.png"),  # 10 valid
        row(11, image_path="images/one.png"),  # 11 valid, warning
        row(12, image_path="images/bomb.png"),  # 12
        row(0),  # 13 duplicate
        row(14, level="嚴重"),  # 14 valid, normalised
        row(15, level="高"),  # 15
        row(16, **{"data_纠正和预防建议": ""}),  # 16
        row(17, 位置信息="2层"),  # 17 valid
    ]
    palette_bytes = image_bytes(palette, "PNG", transparency=0)
    images = {
        "images/truncated.jpg": good[: len(good) // 2],
        "images/zero.jpg": b"",
        "images/jpeg_named.png": good,
        "images/cmyk.jpg": image_bytes(cmyk, "JPEG"),
        "images/sixteen.png": image_bytes(sixteen, "PNG"),
        "images/palette.png": palette_bytes,
        "images/one.png": image_bytes(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
        "images/bomb.png": image_bytes(Image.new("L", (400, 400)), "PNG"),
        "images/missing.jpg": None,
    }
    return make_raw_dataset(rows, images=images)


HOSTILE_REASONS = {
    1: ["image_path escapes the dataset folder ('..')"],
    2: ["image_path is absolute; it must be relative to the dataset folder"],
    3: ["image_path is a URL; only paths inside the dataset folder are allowed"],
    4: ["image file not found"],
    5: ["image data is truncated"],
    6: ["empty file (0 bytes)"],
    12: ["image is 400x400 = 160000 pixels, over the limit of 100000"],
    13: ["duplicate of row 0"],
    15: ["data_风险等级 '高' is not one of 轻微/中等/严重"],
    16: ["data_纠正和预防建议 is empty"],
}


@pytest.mark.parametrize("workers", [1, 2])
def test_hostile_inputs_each_get_their_exact_reason(make_raw_dataset, tmp_path, workers):
    ds = _hostile(make_raw_dataset)
    out = tmp_path / f"report{workers}"
    result = validate(ds.csv_path, ds.root, output_dir=out, max_reject_ratio=0.6, max_image_pixels=100_000, num_workers=workers)
    assert _reasons(result) == HOSTILE_REASONS
    assert _valid_rows(result) == [r for r in range(18) if r not in HOSTILE_REASONS]  # no valid row lost
    assert result.passed
    by_row = {r.row: r for r in result.records}
    assert by_row[14].fields["风险等级"] == "严重"
    assert by_row[17].extra == {"位置信息": "2层"}
    assert all(r.image_file.is_relative_to(ds.root.resolve()) for r in result.records)
    report = json.loads((out / REPORT_JSON).read_text(encoding="utf-8"))
    assert (report["rows_total"], report["rows_valid"], report["rows_rejected"]) == (18, 8, 10)
    assert report["rejected"][0] == {"row": 1, "image_path": "../outside.jpg", "reasons": HOSTILE_REASONS[1]}
    assert {"row": 14, "column": LEVEL, "before": "嚴重", "after": "严重"} in report["normalised"]
    assert [(w["row"], w["warning"]) for w in report["warnings"]] == [
        (7, "extension '.png' does not match its JPEG content; accepted"),
        (11, "image is only 1x1; the model upsamples it to 28 px"),
    ]
    md = (out / REPORT_MD).read_text(encoding="utf-8")
    assert "| 5 | images/truncated.jpg | image data is truncated |" in md and "FAILED" not in md


def test_report_is_identical_for_one_and_two_workers(make_raw_dataset, tmp_path):
    ds = make_raw_dataset(12)
    a = validate(ds.csv_path, ds.root, num_workers=1).report
    b = validate(ds.csv_path, ds.root, num_workers=2).report
    assert a == b and a["rows_valid"] == 12


# --------------------------------------------------------------------------- CLI exit codes


def _cli(capsys, *args):
    code = cli.main(["validate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exit_0(make_raw_dataset, tmp_path, capsys):
    ds = make_raw_dataset([row(i) for i in range(10)] + [row(0)])
    code, out, err = _cli(capsys, "--csv_path", ds.csv_path, "--image_base_path", ds.root, "--output_path", tmp_path / "r", "--num_workers", 1)
    assert code == 0 and err == ""
    assert "11 rows: 10 valid, 1 rejected (9.1%)" in out
    assert json.loads((tmp_path / "r" / REPORT_JSON).read_text(encoding="utf-8"))["passed"] is True


def test_cli_exit_3_too_many_rejects_still_writes_report(make_raw_dataset, tmp_path, capsys):
    ds = make_raw_dataset([row(0), row(1, level="较严重"), row(2, image_path="../x.jpg")])
    code, _, err = _cli(capsys, "--csv_path", ds.csv_path, "--image_base_path", ds.root, "--output_path", tmp_path / "r", "--max_reject_ratio", 0.5, "--num_workers", 1)
    assert code == 3
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "2 of 3 rows rejected (66.7%), above --max_reject_ratio 0.5" in err
    assert json.loads((tmp_path / "r" / REPORT_JSON).read_text(encoding="utf-8"))["rows_rejected"] == 2


def test_cli_exit_2_unusable_input(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "data.csv", [{"image_path": "a.jpg", "data_风险": "x"}])
    code, _, err = _cli(capsys, "--csv_path", csv_path, "--image_base_path", tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "missing required column(s)" in err
