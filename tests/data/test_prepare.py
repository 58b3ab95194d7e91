from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import image_bytes, row, textured_image
from image_fixtures import mpo
from riskva_core import cli
from riskva_core.data.conversation import PromptTemplate
from riskva_core.errors import RiskvaError
from riskva_core.data.images import RESAMPLE, to_rgb
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.data.samples import SCHEMA_VERSION, read_samples
from riskva_core.schema import LEVELS

SPLITS = ("train", "val", "test")


def _cfg(ds, out, **kw) -> PrepareConfig:
    kw.setdefault("num_workers", 1)
    kw.setdefault("max_image_size", (64, 64))
    return PrepareConfig(csv_path=ds.csv_path, image_base_path=ds.root, output_path=out, **kw)


def _all(out: Path) -> dict[str, list]:
    return {s: read_samples(out, s) for s in SPLITS}


def _file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(make_raw_dataset):
    """24 valid rows (sources 120x90, bigger than the 64x64 box) plus one rejected row; every split gets rows."""
    rows = [row(i, 位置信息=f"{i}号楼") for i in range(24)] + [row(99, level="较严重")]
    return make_raw_dataset(rows, image_size=(120, 90))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"format": "csv"}, "--format must be one of jsonl, parquet"),
        ({"image_quality": 0}, "--image_quality must be within 1..100"),
        ({"max_image_size": (27, 100)}, "--max_image_size needs two sizes >= 28"),
        ({"val_ratio": 1.0}, "--val_ratio must be within [0, 1)"),
        ({"val_ratio": 0.5, "test_ratio": 0.5}, "--val_ratio + --test_ratio must be below 1"),
        ({"num_workers": 0}, "--num_workers must be at least 1"),
    ],
)
def test_config_is_validated(kw, message):
    with pytest.raises(RiskvaError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        PrepareConfig(csv_path="a.csv", image_base_path=".", output_path="out", **kw)


# --------------------------------------------------------------------------- outputs


def test_parquet_layout_schema_and_metadata(dataset, tmp_path):
    out = tmp_path / "pq"
    info = prepare(_cfg(dataset, out, format="parquet", row_group_size=4))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.parquet", "val.parquet", "test.parquet", "split.json", "dataset_info.json", "validation_report.json", "validation_report.md"]
    )
    assert info == json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    # Splits follow each image's seeded content hash (data/split.py): stratified only in expectation.
    assert sum(info["counts"].values()) == 24 and all(info["counts"][s] > 0 for s in SPLITS)
    assert all(sum(info["splits"][s]["levels"].values()) == info["counts"][s] for s in SPLITS)
    assert set(info["splits"]["train"]["levels"]) == set(LEVELS)
    assert info["rows_rejected"] == 1 and info["source_csv_sha256"] == hashlib.sha256(dataset.csv_path.read_bytes()).hexdigest()
    assert info["prompt_template"] == PromptTemplate().to_dict()
    assert info["prepare_config"]["seed"] == 42 and "output_path" not in info["prepare_config"]

    pf = pq.ParquetFile(out / "train.parquet")
    schema = pf.schema_arrow
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert str(schema.field("messages").type) == "list<element: struct<role: string, content: string>>"
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["riskva.schema_version"] == str(SCHEMA_VERSION)
    assert meta["riskva.source_csv_sha256"] == info["source_csv_sha256"]
    assert json.loads(meta["riskva.prepare_config"]) == info["prepare_config"]
    assert pf.metadata.num_row_groups == 5  # 18 rows, 4 per group
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    first = pf.read_row_group(0).to_pylist()[0]
    assert first["image"]["bytes"][:3] == b"\xff\xd8\xff"  # raw JPEG, not base64 text

    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert sorted(r["row"] for r in split["rows"]) == list(range(24)) and split["rejected_rows"] == [24]
    samples = _all(out)
    assert {r["row"]: r["split"] for r in split["rows"]} == {
        int(s.image_id[3:]): name for name, ss in samples.items() for s in ss
    }


def test_jsonl_folder_is_self_contained_and_movable(dataset, tmp_path):
    out = tmp_path / "js"
    prepare(_cfg(dataset, out, format="jsonl"))
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    out.rename(moved)
    samples = _all(moved)
    assert sum(len(v) for v in samples.values()) == 24
    images = sorted(p.name for p in (moved / "images").iterdir())
    assert images == sorted(s.image_file.name for v in samples.values() for s in v)
    line = json.loads((moved / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["image"].startswith("images/") and line["extra"]["位置信息"].endswith("号楼")
    assert samples["train"][0].load_image().size == (64, 48)


def test_jsonl_and_parquet_give_identical_samples(dataset, tmp_path):
    prepare(_cfg(dataset, tmp_path / "js", format="jsonl"))
    prepare(_cfg(dataset, tmp_path / "pq", format="parquet"))
    for split in SPLITS:
        js, pqs = read_samples(tmp_path / "js", split), read_samples(tmp_path / "pq", split)
        assert len(js) == len(pqs) > 0
        for a, b in zip(js, pqs):
            assert (a.id, a.image_id, a.image_path, a.fields, a.messages, a.extra) == (b.id, b.image_id, b.image_path, b.fields, b.messages, b.extra)
            assert a.image_file.read_bytes() == b.image_bytes  # same JPEG bytes, same pixels
    assert len({s.id for s in _all(tmp_path / "pq")["train"]}) == len(read_samples(tmp_path / "pq", "train"))  # distinct images


def test_round_trip_pixels_and_text(make_raw_dataset, tmp_path):
    """CSV → Parquet: decoded image ≈ the EXIF-applied, resized source (an MPO's first frame); text intact."""
    exif = Image.Exif()
    exif[0x0112] = 6
    sources = {f"images/{i:04d}.jpg": textured_image(i, (480, 360)) for i in range(6)}
    imgs = {k: image_bytes(v, "JPEG", quality=95, **({"exif": exif.tobytes()} if k.endswith("0000.jpg") else {})) for k, v in sources.items()}
    imgs["images/0005.png"] = image_bytes(sources.pop("images/0005.jpg"), "PNG")
    imgs.pop("images/0005.jpg")
    imgs["images/0004.jpg"] = mpo(sources["images/0004.jpg"], quality=95)  # a phone JPEG with a second picture
    rows = [row(i) for i in range(5)] + [row(5, image_path="images/0005.png", **{"data_缺陷描述": "含|竖线、引号\"和\n换行"})]
    ds = make_raw_dataset(rows, images=imgs)
    out = tmp_path / "pq"
    prepare(_cfg(ds, out, max_image_size=(200, 200), val_ratio=0.0, test_ratio=0.0))
    samples = {s.image_path: s for s in read_samples(out, "train")}
    assert len(samples) == 6
    for r in rows:
        s = samples[r["image_path"]]
        assert s.fields == {k[5:]: v for k, v in r.items() if k.startswith("data_")}
        ref = to_rgb(Image.open(ds.root / r["image_path"]))
        ref = ref.resize((200, 150) if ref.width > ref.height else (150, 200), RESAMPLE)
        got = s.load_image()
        assert got.size == ref.size
        assert np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32)).mean() < 3.0
    assert samples["images/0000.jpg"].load_image().size == (150, 200)  # EXIF rotation applied
    assert "**缺陷描述**: 含|竖线、引号\"和\n换行" in samples["images/0005.png"].answer


def test_byte_identical_outputs_across_runs(dataset, tmp_path):
    import shutil

    for fmt in ("jsonl", "parquet"):
        a = tmp_path / f"{fmt}_a"
        prepare(_cfg(dataset, a, format=fmt, num_workers=1))
        first = _file_hashes(a)
        shutil.rmtree(a)
        prepare(_cfg(dataset, a, format=fmt, num_workers=2))
        assert _file_hashes(a) == first and len(first) >= 7
    # Parquet embeds the images, so it is identical wherever it is written; JSONL names its
    # images by absolute path (what ms-swift needs), so only its `images` column moves with it.
    b = tmp_path / "parquet_b"
    prepare(_cfg(dataset, b, format="parquet", num_workers=2))
    assert _file_hashes(b) == _file_hashes(tmp_path / "parquet_a")


def test_prompt_config_is_used_and_saved(dataset, tmp_path):
    template = {"system_prompt": "你是检查员。", "instruction": "请评估。", "answer_template": "{风险等级}|{风险}|{纠正和预防建议}|{缺陷描述}"}
    cfg_file = tmp_path / "prompt.json"
    cfg_file.write_text(json.dumps(template, ensure_ascii=False), encoding="utf-8")
    info = prepare(_cfg(dataset, tmp_path / "pq", prompt_config=cfg_file))
    assert info["prompt_template"] == template
    s = read_samples(tmp_path / "pq", "train")[0]
    assert s.messages[0]["content"][0]["text"] == "你是检查员。"
    assert s.answer == "|".join(s.fields[k] for k in ("风险等级", "风险", "纠正和预防建议", "缺陷描述"))


def test_legacy_base64_parquet_still_reads(tmp_path):
    data = image_bytes(textured_image(3))
    legacy = pd.DataFrame(
        [{"image": base64.b64encode(data).decode(), "messages": json.dumps([{"role": "user", "content": [{"type": "text", "text": "q"}]}]), "风险": "r", "风险等级": "中等", "纠正和预防建议": "a", "缺陷描述": "d"}]
    )
    legacy.to_parquet(tmp_path / "train.parquet")
    (sample,) = read_samples(tmp_path / "train.parquet")
    assert sample.image_bytes == data and sample.fields["风险等级"] == "中等"
    assert sample.load_image().size == (64, 48)


# --------------------------------------------------------------------------- failure and atomicity


def test_reject_ratio_exceeded_writes_only_the_report(make_raw_dataset, tmp_path, capsys):
    ds = make_raw_dataset([row(0), row(1, level="高"), row(2, image_path="/abs.jpg")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"stale")
    code = cli.main(["prepare", "--csv_path", str(ds.csv_path), "--image_base_path", str(ds.root), "--output_path", str(out), "--num_workers", "1"])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "2 of 3 rows rejected" in err
    assert sorted(p.name for p in out.iterdir()) == ["validation_report.json", "validation_report.md"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_cli_exit_0_and_existing_output_replaced(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", "--format", "jsonl", "--csv_path", str(dataset.csv_path), "--image_base_path", str(dataset.root), "--output_path", str(out), "--max_image_size", "64", "64", "--num_workers", "1"]
    assert cli.main(args) == 0
    (out / "stray.txt").write_text("old")
    assert cli.main(args + ["--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "wrote jsonl dataset" in captured.out and captured.err == ""
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))["seed"] == 3


def test_cli_missing_flags_is_one_line(capsys):
    assert cli.main(["prepare", "--csv_path", "x.csv"]) == 2
    err = capsys.readouterr().err
    assert err == "riskva prepare: error: missing required flag(s) --image_base_path, --output_path\n"


def test_prepared_files_are_what_ms_swift_and_llamafactory_read_as_they_are(dataset, tmp_path):
    """The format invariants that let ms-swift (4.6) and LLaMA-Factory (0.9.5) train on a prepared
    folder with no conversion (checked once against both tools; see README "Other trainers"):
    plain-string contents, one ``<image>`` tag leading the user turn, an absolute ``images`` path in
    JSONL, a list-typed ``messages`` column in Parquet, and LLaMA-Factory entries in dataset_info."""
    import pyarrow.parquet as pq

    out_js, out_pq = tmp_path / "js", tmp_path / "pq"
    prepare(_cfg(dataset, out_js, format="jsonl"))
    prepare(_cfg(dataset, out_pq, format="parquet"))
    for fmt, out in (("jsonl", out_js), ("parquet", out_pq)):
        info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
        for split in SPLITS:
            entry = info[f"riskva_{split}"]
            assert entry["formatting"] == "sharegpt" and (out / entry["file_name"]).is_file()
            rows = ([json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
                    if fmt == "jsonl" else pq.read_table(out / f"{split}.parquet").to_pylist())
            assert rows
            for row in rows:
                roles = [m["role"] for m in row["messages"]]
                assert roles == ["system", "user", "assistant"]
                assert all(isinstance(m["content"], str) for m in row["messages"])
                text = "".join(m["content"] for m in row["messages"])
                assert text.count("<image>") == 1 and row["messages"][1]["content"].startswith("<image>")
                assert row[entry["columns"]["images"]]
                if fmt == "jsonl":
                    (path,) = row["images"]
                    assert Path(path).is_absolute() and Path(path).read_bytes() == (out / row["image"]).read_bytes()
    # RisKVA reads them back as the Qwen2.5-VL content lists the template builds.
    sample = read_samples(out_js, "train")[0]
    assert sample.messages == PromptTemplate().messages(None, sample.fields)
