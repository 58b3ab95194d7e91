from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from model_fixtures import make_parquet_twin, make_prepared_dataset
from riskva_core import cli
from riskva_core.evaluate import metrics as M
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.report import evaluate
from riskva_core.data.samples import read_samples

LEVELS = ["轻微", "中等", "严重"]


def _truth(i: int) -> dict[str, str]:
    return {
        "风险": "墙体开裂影响结构耐久性",
        "风险等级": LEVELS[i % 3],
        "纠正和预防建议": "建议对裂缝进行注浆修补并加强养护",
        "缺陷描述": f"墙面裂缝，长度约{i}厘米",
    }


def _predictions(tmp: Path, n: int = 24) -> list[dict]:
    """Deterministic predictions: every 4th level shifted up, every 5th unparsed, #7 a failed image."""
    recs = []
    for i in range(n):
        img = tmp / f"img{i:02d}.jpg"
        Image.new("RGB", (96, 64), (10 * i % 255, 120, 80)).save(img)
        gt = _truth(i)
        level = LEVELS[(i + 1) % 3] if i % 4 == 0 else gt["风险等级"]
        parsed = {"风险": "墙体开裂", "风险等级": level, "纠正和预防建议": gt["纠正和预防建议"], "缺陷描述": "墙面裂缝"}
        if i % 5 == 0:
            parsed = {"风险": None, "风险等级": None, "纠正和预防建议": None, "缺陷描述": None}
        rec = {"id": f"s{i:02d}", "image": str(img), "image_id": str(i), "image_path": img.name,
               "raw_output": "…", "parsed": parsed, "parse_ok": i % 5 != 0, "ground_truth": gt}
        if i == 7:
            rec.update(error="img07.jpg: cannot decode image", raw_output=None,
                       parsed={k: None for k in gt}, parse_ok=False)
        recs.append(rec)
    return recs


@pytest.fixture()
def preds(tmp_path):
    recs = _predictions(tmp_path)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path, recs


def test_report_numbers(preds, tmp_path):
    path, recs = preds
    report = evaluate(path, tmp_path / "R", n_resamples=200)
    on_disk = json.loads((tmp_path / "R" / "report.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(report))
    n = len(recs)
    n_unparsed = len([i for i in range(n) if i % 5 == 0 or i == 7])  # 0,5,10,15,20 + failed 7
    assert report["n"] == n and report["n_errors"] == 1
    assert report["parse_rate"] == pytest.approx((n - n_unparsed) / n)
    assert report["field_presence"]["风险等级"] == pytest.approx((n - n_unparsed) / n)
    # the level block is exactly level_metrics on the same labels, failures as INVALID
    y_true = [r["ground_truth"]["风险等级"] for r in recs]
    y_pred = ["INVALID" if r.get("error") else (r["parsed"]["风险等级"] or "INVALID") for r in recs]
    assert report["risk_level"] == json.loads(json.dumps(M.level_metrics(y_true, y_pred)))
    assert sum(map(sum, report["risk_level"]["confusion"])) == n
    assert report["risk_level"]["confusion"][LEVELS.index(y_true[7])][3] >= 1  # the failed image is INVALID
    for f in ("风险", "纠正和预防建议", "缺陷描述", "mean"):
        assert set(report["text"][f]) == set(M.TEXT_METRICS)
    # advice is copied verbatim when present → its char ROUGE-L equals the presence rate
    assert report["text"]["纠正和预防建议"]["rouge_l_char"] == pytest.approx(report["parse_rate"])
    for key in ("level_accuracy", "macro_f1", "parse_rate", "severe_recall", "rouge_l_char_mean"):
        lo, hi = report["ci95"][key]
        assert lo <= hi
    assert report["ci95"]["level_accuracy"][0] <= report["risk_level"]["accuracy"] <= report["ci95"]["level_accuracy"][1]
    assert report["baselines"]["majority"]["level"] == "轻微"  # 8/8/8 tie → milder level
    assert len(report["worst"]) == 20
    scores = [w["score"] for w in report["worst"]]
    assert scores == sorted(scores)
    assert report["worst"][0]["score"] == 0.0


def test_report_files_are_self_contained_and_deterministic(preds, tmp_path):
    path, _ = preds
    evaluate(path, tmp_path / "A", n_resamples=100)
    evaluate(path, tmp_path / "B", n_resamples=100)
    files_a = sorted(p.relative_to(tmp_path / "A") for p in (tmp_path / "A").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "B") for p in (tmp_path / "B").rglob("*") if p.is_file())
    assert files_a == files_b
    assert {"report.json", "report.md", "report.html", "figures/confusion_matrix.png", "figures/per_class.png"} <= {
        str(p) for p in files_a}
    assert len([p for p in files_a if str(p).startswith("thumbs/")]) == 20
    for rel in files_a:
        assert (tmp_path / "A" / rel).read_bytes() == (tmp_path / "B" / rel).read_bytes(), rel
    html = (tmp_path / "A" / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html)
    assert len(srcs) == 2 + 20  # two charts + one thumbnail per worst sample
    assert all(s.startswith("data:image/") for s in srcs)
    assert "<link" not in html and "<script" not in html
    assert (tmp_path / "A" / "figures" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "A" / "report.md").read_text(encoding="utf-8")
    assert "](figures/confusion_matrix.png)" in md and "](thumbs/01.jpg)" in md
    assert "墙面裂缝，长度约" in md and "墙面裂缝，长度约" in html  # truth shown beside the prediction


def test_baseline_paired_comparison(preds, tmp_path):
    path, recs = preds
    # the baseline always answers 中等 and carries no ground truth: truth comes from the predictions by id
    base = [{"id": r["id"], "parsed": {**_truth(i), "风险等级": "中等"}, "raw_output": "x"} for i, r in enumerate(recs)]
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(base, ensure_ascii=False), encoding="utf-8")
    report = evaluate(path, tmp_path / "R", baseline=base_path, n_resamples=200)
    sup = report["baselines"]["supplied"]
    assert sup["file"] == "base.json"
    assert sup["metrics"]["risk_level"]["accuracy"] == pytest.approx(1 / 3)
    assert sup["paired"]["n_matched"] == len(recs)
    acc = sup["paired"]["accuracy"]
    assert acc["delta"] == pytest.approx(report["risk_level"]["accuracy"] - 1 / 3)
    assert acc["ci95"][0] <= acc["delta"] <= acc["ci95"][1]
    assert 0 < acc["p_value"] <= 1
    # the baseline copies the truth text, so this model's ROUGE-L is lower
    assert sup["paired"]["rouge_l_char"]["delta"] < 0
    assert "this − baseline" in (tmp_path / "R" / "report.md").read_text(encoding="utf-8")


def test_thumbnails_from_parquet_bytes_by_sample_id(tmp_path):
    ds = make_parquet_twin(make_prepared_dataset(tmp_path / "jsonl", 10), tmp_path / "pq")
    samples = read_samples(ds, "train")
    recs = [{"id": s.id, "image": s.id, "image_id": s.image_id, "image_path": s.image_path, "raw_output": "",
             "parsed": {k: None for k in s.fields}, "parse_ok": False, "ground_truth": s.fields} for s in samples]
    without = evaluate(recs, tmp_path / "R0", n_resamples=50)
    assert not list((tmp_path / "R0" / "thumbs").iterdir())  # sample ids are not paths
    assert without["n"] == len(samples)
    evaluate(recs, tmp_path / "R1", image_root=ds, n_resamples=50)
    assert len(list((tmp_path / "R1" / "thumbs").iterdir())) == len(samples)


def test_missing_ground_truth_is_a_one_line_error(preds, tmp_path, capsys):
    path, recs = preds
    del recs[3]["ground_truth"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(RiskvaError, match=r"entry 3 \(id s03\) has no ground_truth"):
        evaluate(bad, tmp_path / "R")
    assert cli.main(["evaluate", "--predictions", str(bad), "--output_dir", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err
    assert "s03" in err and "Traceback" not in err
    assert not (tmp_path / "R" / "report.json").exists()


def test_cli_writes_report(preds, tmp_path, capsys):
    path, _ = preds
    rc = cli.main(["evaluate", "--predictions", str(path), "--output_dir", str(tmp_path / "R"), "--n_resamples", "50",
                   "--n_worst", "3"])
    assert rc == 0
    assert "accuracy=" in capsys.readouterr().out
    report = json.loads((tmp_path / "R" / "report.json").read_text(encoding="utf-8"))
    assert len(report["worst"]) == 3 and report["config"]["n_resamples"] == 50


def _other_tool(recs: list[dict]) -> list[dict]:
    """The same answers as another tool writes them: no id, its own image folder, raw text only
    for half of them (the rest parsed), ground truth beside."""
    out = []
    for i, r in enumerate(recs):
        entry = {"image": f"/data/other-tool/{Path(r['image']).name}", "ground_truth": r["ground_truth"]}
        if r.get("error"):
            entry["error"] = r["error"]
        elif i % 2:
            entry["parsed"] = r["parsed"]
        else:
            entry["raw_output"] = "\n".join(f"{k}：{v}" for k, v in r["parsed"].items() if v is not None)
        out.append(entry)
    return out


def test_predictions_without_id_are_keyed_by_image(preds, tmp_path, capsys):
    path, recs = preds
    ours = evaluate(path, tmp_path / "ours", n_resamples=50)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_other_tool(recs), ensure_ascii=False), encoding="utf-8")
    assert cli.main(["evaluate", "--predictions", str(other), "--output_dir", str(tmp_path / "R"),
                     "--n_resamples", "50"]) == 0
    report = json.loads((tmp_path / "R" / "report.json").read_text(encoding="utf-8"))
    assert report["n"] == ours["n"] and report["config"]["matched_by"] == "image" and ours["config"]["matched_by"] == "id"
    assert report["risk_level"]["accuracy"] == pytest.approx(ours["risk_level"]["accuracy"])
    assert "/data/other-tool" not in (tmp_path / "R" / "report.json").read_text(encoding="utf-8")
    # As a baseline against our id'd predictions, both are keyed by image file name and pair up.
    paired = evaluate(path, tmp_path / "P", baseline=other, n_resamples=50)["baselines"]["supplied"]["paired"]
    assert paired["n_matched"] == len(recs) and paired["n_only_predictions"] == 0
    assert paired["accuracy"]["delta"] == pytest.approx(0.0)


def test_an_entry_with_neither_id_nor_image_is_a_one_line_error(preds, tmp_path, capsys):
    _, recs = preds
    entries = _other_tool(recs)
    del entries[5]["image"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    assert cli.main(["evaluate", "--predictions", str(bad), "--output_dir", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.json: entry 5 has neither 'id' nor 'image'" in err and "Traceback" not in err
