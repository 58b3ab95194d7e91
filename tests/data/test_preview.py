from __future__ import annotations

import base64
import json

import pandas as pd
import pytest
from PIL import Image

from conftest import image_bytes, row, textured_image
from riskva_core import cli
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.data.preview import preview


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import build_raw_dataset

    root = tmp_path_factory.mktemp("preview")
    ds = build_raw_dataset(root / "raw", [row(i) for i in range(21)])
    outs = {}
    for fmt in ("jsonl", "parquet"):
        outs[fmt] = root / fmt
        prepare(PrepareConfig(ds.csv_path, ds.root, outs[fmt], format=fmt, num_workers=1, max_image_size=(32, 32)))
    return outs


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_folder_preview_shows_counts_levels_and_rows(prepared, fmt):
    text = preview(prepared[fmt], num_rows=2)
    info = json.loads((prepared[fmt] / "dataset_info.json").read_text(encoding="utf-8"))
    lines = text.splitlines()
    assert lines[0] == f"dataset: {prepared[fmt]} ({fmt})"
    train = next(l for l in lines if l.startswith("train "))
    assert train.split()[1:] == [str(info["counts"]["train"])] + [str(info["splits"]["train"]["levels"][lvl]) for lvl in ("轻微", "中等", "严重")] + ["0"]
    assert next(l for l in lines if l.startswith("total ")).split()[1] == "21"
    # Up to num_rows rows per split (splits follow each image's hash, so a small split may hold fewer).
    assert all(text.count(f"[{s} ") == min(2, info["counts"][s]) > 0 for s in ("train", "val", "test"))
    assert "  answer: **风险描述**: " in text


def test_single_file_and_dump_images(prepared, tmp_path):
    text = preview(prepared["parquet"] / "val.parquet", num_rows=1, dump_images=tmp_path / "dump", num_images=2)
    assert text.count("[val ") == 1 and "wrote 2 image(s)" in text
    dumped = sorted((tmp_path / "dump").iterdir())
    assert len(dumped) == 2 and all(p.name.startswith("val_") and p.suffix == ".jpg" for p in dumped)
    assert Image.open(dumped[0]).size[0] <= 32
    text = preview(prepared["jsonl"] / "test.jsonl", num_rows=0, dump_images=tmp_path / "dump2", num_images=1)
    assert "[test " not in text and len(list((tmp_path / "dump2").iterdir())) == 1


def test_legacy_base64_parquet(tmp_path):
    data = image_bytes(textured_image(1), "PNG")
    pd.DataFrame([{"image": base64.b64encode(data).decode(), "风险等级": "严重", "风险": "r", "纠正和预防建议": "a", "缺陷描述": "d"}]).to_parquet(tmp_path / "old.parquet")
    text = preview(tmp_path / "old.parquet", dump_images=tmp_path / "d", num_images=1)
    assert "old  " in text and "  风险等级: 严重" in text
    assert [p.suffix for p in (tmp_path / "d").iterdir()] == [".png"]


@pytest.mark.parametrize("argv", [["preview"], ["--preview"], ["prepare", "--preview"]])
def test_cli_spellings(prepared, capsys, argv):
    assert cli.main([*argv, str(prepared["parquet"] / "train.parquet")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dataset: {prepared['parquet'] / 'train.parquet'} (parquet)")


def test_cli_bad_path_is_one_line(tmp_path, capsys):
    assert cli.main(["preview", str(tmp_path / "nope.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err
