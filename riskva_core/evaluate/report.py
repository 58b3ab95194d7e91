"""Score predictions (written by ``riskva infer --compare_gt``) and write the evaluation report.

    riskva evaluate --predictions out.json --output_dir REPORT [--baseline other.json] [--image_root DIR]

REPORT/report.json   every number (definitions in metrics.py, copied into the report)
REPORT/report.md     the same for people, with figures/*.png and thumbs/*.jpg beside it
REPORT/report.html   one self-contained file (charts and thumbnails embedded)

A prediction with ``error`` (an image that could not be read) counts as a failure:
no fields, level INVALID. Every prediction needs ``ground_truth``; a ``--baseline``
file may omit it, its truth is then taken from the predictions with the same ``id``.
Entries without ``id`` (another tool's output: ``image``, ``raw_output``/``parsed``,
``ground_truth``) are matched by image instead (evaluate/keys.py).
No timestamps or absolute paths enter the outputs, so the same inputs give the same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from riskva_core.evaluate import metrics as M
from riskva_core.atomic import atomic_dir, write_bytes, write_json, write_text
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.keys import key_records
from riskva_core.schema import FIELD_LEVEL, FIELDS, LEVEL_RANK, LEVELS, TEXT_FIELDS, normalize_level

DEFAULT_WORST = 20


@dataclasses.dataclass
class EvaluateConfig:
    predictions: Path
    output_dir: Path
    baseline: Path | None = None
    image_root: Path | None = None
    n_resamples: int = M.DEFAULT_RESAMPLES
    seed: int = M.DEFAULT_SEED
    n_worst: int = DEFAULT_WORST

    def __post_init__(self) -> None:
        self.predictions = Path(self.predictions)
        self.output_dir = Path(self.output_dir)
        self.baseline = Path(self.baseline) if self.baseline is not None else None
        self.image_root = Path(self.image_root) if self.image_root is not None else None
        if self.n_resamples < 1:
            raise RiskvaError(f"--n_resamples must be >= 1, got {self.n_resamples}")
        if self.n_worst < 0:
            raise RiskvaError(f"--n_worst must be >= 0, got {self.n_worst}")
        if self.image_root is not None and not self.image_root.exists():
            raise RiskvaError(f"--image_root {self.image_root}: no such file or folder")


# ---------------------------------------------------------------- loading

def load_predictions(path: str | Path, flag: str = "--predictions") -> tuple[list[dict], str]:
    """The prediction records and the sha256 of the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise RiskvaError(f"{flag} {p}: cannot read ({exc.strerror or exc})") from None
    try:
        records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RiskvaError(f"{flag} {p}: not valid JSON ({exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RiskvaError(f"{flag} {p}: expected a JSON list of prediction objects")
    return records, hashlib.sha256(data).hexdigest()


def _check_records(records: Sequence[dict], where: str, need_truth: bool = True) -> None:
    seen: set[str] = set()
    for i, r in enumerate(records):
        if "id" not in r:
            raise RiskvaError(f"{where}: entry {i} has no 'id'")
        rid = str(r["id"])
        if rid in seen:
            raise RiskvaError(f"{where}: duplicate id {rid!r} (entry {i})")
        seen.add(rid)
        gt = r.get("ground_truth")
        if gt is None and not need_truth:
            continue
        if not isinstance(gt, dict):
            raise RiskvaError(f"{where}: entry {i} (id {rid}) has no ground_truth; run infer with --compare_gt")
        if normalize_level(gt.get(FIELD_LEVEL)) is None:
            raise RiskvaError(
                f"{where}: entry {i} (id {rid}) ground-truth 风险等级 {gt.get(FIELD_LEVEL)!r} is not one of {LEVELS}"
            )


def _predicted_fields(r: Mapping) -> dict[str, str | None]:
    if r.get("error"):
        return {f: None for f in FIELDS}
    parsed = r.get("parsed")
    if not isinstance(parsed, Mapping):
        from riskva_core.evaluate.parse import parse_answer  # records without ``parsed`` (hand-made) are parsed here

        parsed = parse_answer(r.get("raw_output") or "").parsed
    return {f: (None if parsed.get(f) in (None, "") else str(parsed.get(f))) for f in FIELDS}


# ---------------------------------------------------------------- scoring

def score_records(records: Sequence[dict]) -> list[dict]:
    """Per-sample scores (metrics.sample_scores) plus presence flags, in record order."""
    out = []
    for r in records:
        pred = _predicted_fields(r)
        s = M.sample_scores(pred, r["ground_truth"])
        s["id"] = str(r["id"])
        s["predicted"] = pred
        s["present"] = {f: pred[f] is not None for f in FIELDS}
        s["error"] = r.get("error")
        s["group"] = r.get("group")  # the split's near-duplicate group: the bootstrap's unit
        out.append(s)
    return out


def summarize(scores: Sequence[dict]) -> dict:
    """Aggregate metrics of per-sample scores (no intervals, no baselines)."""
    n = len(scores)
    y_true = [s["true_level"] for s in scores]
    y_pred = [s["pred_level"] for s in scores]
    all_present = [all(s["present"].values()) for s in scores]
    text: dict[str, dict[str, float | None]] = {}
    for f in (*TEXT_FIELDS, "mean"):
        vals = [s["mean"] if f == "mean" else s["fields"][f] for s in scores]
        text[f] = {m: (float(np.mean([v[m] for v in vals])) if n else None) for m in M.TEXT_METRICS}
    return {
        "n": n,
        "n_errors": sum(1 for s in scores if s["error"]),
        "parse_rate": float(np.mean(all_present)) if n else None,
        "parse_ok_rate": float(np.mean([p and s["pred_level"] in LEVEL_RANK for p, s in zip(all_present, scores)]))
        if n else None,
        "field_presence": {f: (float(np.mean([s["present"][f] for s in scores])) if n else None) for f in FIELDS},
        "risk_level": M.level_metrics(y_true, y_pred),
        "text": text,
    }


def headline_cis(scores: Sequence[dict], n_resamples: int, seed: int) -> dict[str, list[float] | None]:
    """Bootstrap 95% intervals of the headline metrics; every metric sees the same group draws."""
    n = len(scores)
    codes = {lvl: i for i, lvl in enumerate(M.CONFUSION_LABELS)}
    y_true = np.array([codes[s["true_level"]] for s in scores], dtype=np.int64)
    y_pred = np.array([codes[s["pred_level"]] for s in scores], dtype=np.int64)
    present = np.array([all(s["present"].values()) for s in scores], dtype=float)
    rouge = np.array([s["mean"]["rouge_l_char"] for s in scores], dtype=float)
    correct = np.array([s["level_correct"] for s in scores], dtype=float)
    severe = codes[LEVELS[-1]]
    groups = [s.get("group") for s in scores]

    def ci(stat):
        return M.bootstrap_ci(n, stat, n_resamples, seed, groups=groups)

    def severe_recall(idx):
        mask = y_true[idx] == severe
        return float((y_pred[idx][mask] == severe).mean()) if mask.any() else None

    return {
        "level_accuracy": ci(lambda idx: float(correct[idx].mean())),
        "macro_f1": ci(lambda idx: M.macro_f1_codes(y_true[idx], y_pred[idx])),
        "parse_rate": ci(lambda idx: float(present[idx].mean())),
        "severe_recall": ci(severe_recall),
        "rouge_l_char_mean": ci(lambda idx: float(rouge[idx].mean())),
    }


def _worst(scores: Sequence[dict], records: Sequence[dict], k: int) -> list[dict]:
    ranked = sorted(
        range(len(scores)),
        key=lambda i: (0.5 * scores[i]["level_correct"] + 0.5 * scores[i]["mean"]["rouge_l_char"], scores[i]["id"]),
    )
    out = []
    for i in ranked[:k]:
        s, r = scores[i], records[i]
        out.append({
            "id": s["id"],
            "score": 0.5 * s["level_correct"] + 0.5 * s["mean"]["rouge_l_char"],
            "true_level": s["true_level"],
            "pred_level": s["pred_level"],
            "rouge_l_char": s["mean"]["rouge_l_char"],
            "predicted": s["predicted"],
            "truth": {f: r["ground_truth"].get(f) for f in FIELDS},
            "error": s["error"],
            "raw_output": r.get("raw_output"),
            "image": r.get("image"),
            "image_path": r.get("image_path"),
        })
    return out


def build_report(
    records: Sequence[dict],
    baseline: Sequence[dict] | None = None,
    n_resamples: int = M.DEFAULT_RESAMPLES,
    seed: int = M.DEFAULT_SEED,
    n_worst: int = DEFAULT_WORST,
    source: Mapping[str, Any] | None = None,
) -> tuple[dict, list[dict]]:
    """The report dict and the worst samples (full detail, for rendering)."""
    _check_records(records, str((source or {}).get("predictions", "predictions")))
    if not records:
        raise RiskvaError("predictions: the list is empty; nothing to evaluate")
    scores = score_records(records)
    report = summarize(scores)
    report["ci95"] = headline_cis(scores, n_resamples, seed)
    y_true = [s["true_level"] for s in scores]
    report["baselines"] = {"majority": M.majority_baseline(y_true)}
    if baseline is not None:
        report["baselines"]["supplied"] = _baseline_section(scores, records, baseline, n_resamples, seed, source)
    worst = _worst(scores, records, n_worst)
    report["worst"] = [
        {k: w[k] for k in ("id", "score", "true_level", "pred_level", "rouge_l_char", "error")} for w in worst
    ]
    report["definitions"] = dict(M.DEFINITIONS)
    report["config"] = {
        "predictions": "(in memory)",
        "predictions_sha256": "",
        "n_resamples": n_resamples,
        "seed": seed,
        "n_worst": n_worst,
        **{k: v for k, v in (source or {}).items()},
    }
    return report, worst


def _baseline_section(scores, records, baseline, n_resamples, seed, source) -> dict:
    where = str((source or {}).get("baseline", "baseline"))
    truth = {str(r["id"]): r["ground_truth"] for r in records}
    _check_records(baseline, where, need_truth=False)
    filled = []
    for r in baseline:
        if r.get("ground_truth") is None:
            rid = str(r["id"])
            if rid not in truth:
                raise RiskvaError(f"{where}: id {rid!r} has no ground_truth and is not in the predictions")
            r = {**r, "ground_truth": truth[rid]}
        filled.append(r)
    b_scores = score_records(filled)
    a_by_id = {s["id"]: s for s in scores}
    b_by_id = {s["id"]: s for s in b_scores}
    ids = sorted(set(a_by_id) & set(b_by_id))
    groups = [a_by_id[i]["group"] if a_by_id[i]["group"] is not None else b_by_id[i]["group"] for i in ids]
    paired = {
        "accuracy": M.paired_bootstrap([a_by_id[i]["level_correct"] for i in ids],
                                       [b_by_id[i]["level_correct"] for i in ids], n_resamples, seed, groups),
        "rouge_l_char": M.paired_bootstrap([a_by_id[i]["mean"]["rouge_l_char"] for i in ids],
                                           [b_by_id[i]["mean"]["rouge_l_char"] for i in ids], n_resamples, seed,
                                           groups),
    }
    return {
        "file": (source or {}).get("baseline", "baseline"),
        "sha256": (source or {}).get("baseline_sha256"),
        "metrics": summarize(b_scores),
        "paired": {**paired, "n_matched": len(ids), "n_only_predictions": len(set(a_by_id) - set(b_by_id)),
                   "n_only_baseline": len(set(b_by_id) - set(a_by_id))},
    }


# ---------------------------------------------------------------- thumbnails

class _ImageFinder:
    """Find a prediction's image: by sample id in a prepared dataset, or by path."""

    def __init__(self, image_root: Path | None):
        self.root = image_root
        self._samples: dict[str, Any] | None = None

    def _dataset_samples(self) -> dict[str, Any]:
        if self._samples is None:
            from riskva_core.data.samples import SPLITS, read_samples

            self._samples = {}
            if self.root is not None:
                try:
                    splits = [None] if self.root.is_file() else SPLITS
                    for split in splits:
                        try:
                            for s in read_samples(self.root, split or "train"):
                                self._samples.setdefault(s.id, s)
                        except RiskvaError:
                            continue  # a split may be absent
                except RiskvaError:
                    pass
        return self._samples

    def load(self, w: Mapping) -> Any:
        from PIL import Image

        from riskva_core.data.images import ImagePathError, resolve_image_path
        from riskva_core.data.samples import decode_image

        sample = self._dataset_samples().get(str(w["id"])) if self.root is not None else None
        try:
            if sample is not None:
                return sample.load_image()
            for ref in (w.get("image"), w.get("image_path")):
                if not ref:
                    continue
                if self.root is not None and self.root.is_dir():
                    try:
                        path = resolve_image_path(self.root, str(ref))
                    except ImagePathError:
                        path = Path(str(ref))
                        # absolute paths written by infer are accepted only inside the root
                        if not (path.is_absolute() and path.resolve().is_relative_to(self.root.resolve())):
                            continue
                else:
                    path = Path(str(ref))
                if path.is_file():
                    return decode_image(path.read_bytes(), str(path))
        except (RiskvaError, OSError, Image.DecompressionBombError):
            return None
        return None


# ---------------------------------------------------------------- writing

def write_report(report: dict, worst: Sequence[dict], output_dir: Path, image_root: Path | None = None) -> None:
    from riskva_core.evaluate import render as R

    output_dir.mkdir(parents=True, exist_ok=True)
    finder = _ImageFinder(image_root)
    figures = {
        "confusion": R.confusion_png(report["risk_level"]["confusion"], report["risk_level"]["labels"]),
        "per_class": R.per_class_png(report["risk_level"]["per_class"]),
    }
    worst = [dict(w) for w in worst]
    with atomic_dir(output_dir / "thumbs") as thumbs:
        for i, w in enumerate(worst, 1):
            img = finder.load(w)
            if img is None:
                continue
            w["thumb"] = R.thumbnail_jpeg(img)
            name = f"{i:02d}.jpg"
            (thumbs / name).write_bytes(w["thumb"])  # inside atomic_dir: the folder appears whole
            w["thumb_file"] = f"thumbs/{name}"
    fig_files = {"confusion": "figures/confusion_matrix.png", "per_class": "figures/per_class.png"}
    for key, rel in fig_files.items():
        write_bytes(output_dir / rel, figures[key])
    write_json(output_dir / "report.json", report)
    write_text(output_dir / "report.md", R.render_markdown(report, worst, fig_files))
    write_text(output_dir / "report.html", R.render_html(report, worst, figures))


def evaluate(
    predictions: str | Path | Sequence[dict],
    output_dir: str | Path,
    baseline: str | Path | Sequence[dict] | None = None,
    image_root: str | Path | None = None,
    n_resamples: int = M.DEFAULT_RESAMPLES,
    seed: int = M.DEFAULT_SEED,
    n_worst: int = DEFAULT_WORST,
    provenance: Mapping[str, Any] | None = None,
) -> dict:
    """Score ``predictions`` (a file or the records) and write REPORT/report.{json,md,html}.

    ``provenance`` is recorded as is under ``report["provenance"]``: the generation settings
    used, and (in the Dagster graph) the model version and test split content hash the
    predictions are for, which champion_promotion checks before it decides on them.
    """
    source: dict[str, Any] = {}
    if isinstance(predictions, (str, os.PathLike)):
        records, sha = load_predictions(predictions)
        source.update(predictions=Path(predictions).name, predictions_sha256=sha)
    else:
        records = [dict(r) for r in predictions]
        blob = json.dumps(records, ensure_ascii=False, sort_keys=True).encode("utf-8")
        source.update(predictions="(in memory)", predictions_sha256=hashlib.sha256(blob).hexdigest())
    base_records = None
    if baseline is not None:
        if isinstance(baseline, (str, os.PathLike)):
            base_records, bsha = load_predictions(baseline, "--baseline")
            source.update(baseline=Path(baseline).name, baseline_sha256=bsha)
        else:
            base_records = [dict(r) for r in baseline]
            source.update(baseline="(in memory)", baseline_sha256=None)
    # Another tool's predictions have no sample id: key both files by image (evaluate/keys.py).
    records, base_records, source["matched_by"] = key_records(
        records, base_records, str(source["predictions"]), str(source.get("baseline", "baseline")))
    report, worst = build_report(records, base_records, n_resamples, seed, n_worst, source)
    if provenance:
        report["provenance"] = dict(provenance)
    write_report(report, worst, Path(output_dir), Path(image_root) if image_root is not None else None)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riskva evaluate",
        description="Score predictions against ground truth; write report.json, report.md and a "
        "self-contained report.html.",
    )
    p.add_argument("--predictions", required=True, type=Path,
                   help="predictions JSON written by 'riskva infer --compare_gt' (needs ground_truth)")
    p.add_argument("--output_dir", required=True, type=Path, help="report folder (created if missing)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another predictions JSON to compare against (paired bootstrap, matched by id)")
    p.add_argument("--image_root", type=Path, default=None,
                   help="where thumbnails come from: a prepared dataset folder or .parquet/.jsonl file "
                   "(images found by sample id) or a folder the image paths are relative to; default: "
                   "the image paths in the predictions as written")
    p.add_argument("--n_resamples", type=int, default=M.DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples for intervals and p-values (default {M.DEFAULT_RESAMPLES})")
    p.add_argument("--seed", type=int, default=M.DEFAULT_SEED, help=f"bootstrap seed (default {M.DEFAULT_SEED})")
    p.add_argument("--n_worst", type=int, default=DEFAULT_WORST,
                   help=f"how many worst samples the report shows (default {DEFAULT_WORST})")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvaluateConfig(**vars(args))
    report = evaluate(cfg.predictions, cfg.output_dir, cfg.baseline, cfg.image_root, cfg.n_resamples, cfg.seed,
                      cfg.n_worst)
    lvl = report["risk_level"]
    print(
        f"n={report['n']} parse_rate={report['parse_rate']:.3f} accuracy={lvl['accuracy']:.3f} "
        f"macro_f1={lvl['macro_f1']:.3f} rouge_l_char={report['text']['mean']['rouge_l_char']:.3f} "
        f"-> {cfg.output_dir / 'report.html'}"
    )
    return 0
