"""Feedback assets, one partition per UTC day: the day's served answers (inference_log), their drift
against the champion's test split (production_drift) and the photos an inspector sees first
(review_queue). The Label Studio side (tasks, the review sensor, reviewed_dataset) is review_assets.py;
the logic is riskva_core/feedback/."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from riskva_core.errors import RiskvaError

from .asset_metadata import CODE_VERSIONS, md_table
from .resources import DataRootResource, MlflowResource

FEEDBACK = "feedback"
field_day = dg.DailyPartitionsDefinition(start_date="2025-01-01", timezone="UTC", end_offset=1)  # today included


def day_of(context: dg.AssetExecutionContext) -> dt.date:
    return dt.date.fromisoformat(context.partition_key)


def day_path(root: Any, kind: str, day: dt.date, suffix: str = "") -> Path:
    """``$RISKVA_HOME/field/<kind>/<day><suffix>``: the partition-keyed place of a feedback artifact."""
    return root.field_dir / kind / f"{day.isoformat()}{suffix}"


def champion_reference(mlflow: MlflowResource, paths: DataRootResource, reference_dir: str = ""
                       ) -> tuple[Path, str, str, Path | None]:
    """(the champion's prepared folder, its version, its dataset version, its predictions file or None).
    ``reference_dir`` overrides the folder (a prepared folder of train/val/test)."""
    root = paths.layout()
    registry = mlflow.registry()
    version = registry.alias_version("champion")
    dataset = ""
    if version is not None:
        dataset = str(registry.get_version(version).tags.get("dataset_version") or "")
    if reference_dir:
        return Path(reference_dir), version or "none", dataset, None
    if version is None or not dataset:
        raise RiskvaError("no champion with a dataset_version tag to compare the field with: promote one "
                          "(make demo) or set reference_dir")
    predictions = root.reports_dir(dataset) / "predictions.jsonl"
    return root.prepared_dir(dataset, "parquet"), version, dataset, predictions if predictions.is_file() else None


def _reference_batch(folder: Path, predictions: Path | None) -> Any:
    from riskva_core.data.samples import read_samples
    from riskva_core.feedback.drift import batch_from_samples

    samples = read_samples(folder, "test")
    preds = None
    if predictions is not None:
        records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
        preds = {r["id"]: r for r in records}
        if not all(s.id in preds for s in samples):
            preds = None  # made on another split: ground truth stands in (no parse-rate test)
    return batch_from_samples(samples, preds)


class InferenceLogConfig(dg.Config):
    experiment: str = Field(default="riskva-field", description="The MLflow experiment the servers trace into")


@dg.asset(
    partitions_def=field_day,
    group_name=FEEDBACK,
    kinds={"mlflow", "parquet"},
    code_version=CODE_VERSIONS["inference_log"],
    description="The day's served answers (one MLflow trace per request, written by `riskva serve`) as one "
    "Parquet table: photo hash and stored path, model version and alias, latency, parse_ok, the four fields "
    "and the 风险等级 confidence. Written at $RISKVA_HOME/field/inference_log/<day>.parquet.",
)
def inference_log(context: dg.AssetExecutionContext, config: InferenceLogConfig, paths: DataRootResource,
                  mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core.feedback import inference_log as log

    root = paths.layout()
    day = day_of(context)
    result = log.write_inference_log(log.InferenceLogConfig(
        tracking_uri=mlflow.registry().tracking_uri, day=day, output_path=day_path(root, "inference_log", day, ".parquet"),
        experiment_name=config.experiment, photo_dir=root.field_photos))
    versions = md_table(["model version", "answers"], [[v, n] for v, n in sorted(result.model_versions.items())])
    return dg.MaterializeResult(
        metadata={"dagster/row_count": result.rows, "path": dg.MetadataValue.path(str(result.path)),
                  "parse_rate": result.parse_rate, "model_versions": dg.MetadataValue.md(versions),
                  "sha256": result.sha256},
        data_version=dg.DataVersion(result.sha256[:16]))


class ProductionDriftConfig(dg.Config):
    alpha: float = Field(default=0.05, description="Family-wise significance (Bonferroni over the descriptors)")
    max_parse_rate_drop: float = Field(default=0.1, description="parse_rate_held fails (blocking, ERROR) when "
                                       "today's parse rate is this much below the reference's")
    reference_dir: str = Field(default="", description="A prepared folder to compare with; empty: the "
                               "champion's test split (its dataset_version tag)")


def _plots_markdown(plots: dict[str, Path]) -> str:
    """Each drifted descriptor's PNG inline (data URI) under its name, so the UI shows the picture."""
    parts = [f"**{name}** (reference against today)\n\n![{name}](data:image/png;base64,"
             f"{base64.b64encode(Path(path).read_bytes()).decode()})" for name, path in sorted(plots.items())]
    return "\n\n".join(parts) or "Nothing drifted: no plot."


@dg.asset(
    partitions_def=field_day,
    group_name=FEEDBACK,
    kinds={"scipy", "json"},
    deps=["inference_log"],
    code_version=CODE_VERSIONS["production_drift"],
    check_specs=[
        dg.AssetCheckSpec("no_drift", asset="production_drift", description="WARN when a descriptor of today's "
                          "photos or answers drifted from the champion's test split (named two-sample tests)"),
        dg.AssetCheckSpec("parse_rate_held", asset="production_drift", blocking=True,
                          description="ERROR (blocking) when today's parse rate fell more than max_parse_rate_drop "
                          "below the reference's"),
    ],
    description="The day's photos and answers against the champion's test split: image size, brightness, "
    "contrast, sharpness and camera model, the 风险等级 distribution, parse rate and answer length in jieba "
    "tokens, each with a named scipy.stats test (KS, chi-square, Fisher), Bonferroni-corrected. A PNG per "
    "drifted descriptor (reference against today) is shown in the metadata; drift.json/.md, the plots and the "
    "per-photo outlier flags the review queue reads are at $RISKVA_HOME/field/drift/<day>/.",
)
def production_drift(context: dg.AssetExecutionContext, config: ProductionDriftConfig, paths: DataRootResource,
                     mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core import atomic
    from riskva_core.feedback import drift
    from riskva_core.feedback.inference_log import read_inference_log

    root = paths.layout()
    day = day_of(context)
    folder = day_path(root, "drift", day)
    frame = read_inference_log(day_path(root, "inference_log", day, ".parquet"))
    reference_dir, champion, dataset, predictions = champion_reference(mlflow, paths, config.reference_dir)
    reference, current = _reference_batch(reference_dir, predictions), drift.batch_from_log(frame)
    report = drift.compare_batches(reference, current, drift.DriftConfig(alpha=config.alpha, plot_dir=folder))
    outlying = drift.outlying_photos(drift.describe(reference), drift.describe(current), report.drifted) \
        if len(current.images) else []
    drift.write_report(report, folder)
    atomic.write_json(folder / "outlying.json", outlying)
    drop = report.parse_rate_drop
    summary = json.dumps(report.to_dict(), sort_keys=True, default=str)
    checks = [
        dg.AssetCheckResult(check_name="no_drift", passed=not report.drifted, severity=dg.AssetCheckSeverity.WARN,
                            description=f"drifted: {', '.join(report.drifted)}" if report.drifted else "no drift",
                            metadata={"drifted": ", ".join(report.drifted) or "none"}),
        dg.AssetCheckResult(check_name="parse_rate_held", passed=drop is None or drop <= config.max_parse_rate_drop,
                            severity=dg.AssetCheckSeverity.ERROR,
                            description=("no parse rate to compare" if drop is None else
                                         f"parse rate {report.parse_rate_current:.1%} vs {report.parse_rate_reference:.1%}"
                                         f" (drop {drop:.1%}, margin {config.max_parse_rate_drop:.1%})"),
                            metadata={"parse_rate_drop": drop, "margin": config.max_parse_rate_drop}),
    ]
    return dg.MaterializeResult(
        metadata={"photos_today": len(current.images), "photos_reference": len(reference.images),
                  "champion_version": champion, "reference": str(reference_dir), "reference_dataset": dataset,
                  "drifted": ", ".join(report.drifted) or "none", "tests": dg.MetadataValue.md(report.markdown()),
                  "plots": dg.MetadataValue.md(_plots_markdown(report.plots)),
                  "report": dg.MetadataValue.path(str(folder / "drift.json")),
                  "parse_rate_today": report.parse_rate_current, "parse_rate_reference": report.parse_rate_reference,
                  "outlying_photos": sum(outlying)},
        data_version=dg.DataVersion(hashlib.sha256(summary.encode()).hexdigest()[:16]),
        check_results=checks)


class ReviewQueueConfig(dg.Config):
    size: int = Field(default=50, description="Photos in the day's queue")
    random_share: float = Field(default=0.2, description="Share drawn at random (seeded) so the reviewed data "
                                "is not biased toward hard cases")
    seed: int = Field(default=0, description="Seed of the random share")
    confidence_below: float = Field(default=0.9, description="A parsed, undrifted answer at least this sure is not "
                                    "a hard case")
    reference_dir: str = Field(default="", description="As production_drift's: the prepared folder whose photos "
                               "are already training data (deduplicated against)")


def known_photos(folder: Path) -> list:
    """Photos already in the data: the prepared folder's split.json, else hashed from its samples."""
    from riskva_core.data.samples import SPLITS, read_samples
    from riskva_core.feedback.review_queue import KnownPhoto, known_from_split, photo_phash

    if (folder / "split.json").is_file():
        return known_from_split(folder)
    out = []
    for split in SPLITS:
        for s in read_samples(folder, split):
            data = s.image_data()
            out.append(KnownPhoto(hashlib.sha256(data).hexdigest(), photo_phash(data), split))
    return out


@dg.asset(
    partitions_def=field_day,
    group_name=FEEDBACK,
    kinds={"json"},
    deps=["inference_log", "production_drift"],
    code_version=CODE_VERSIONS["review_queue"],
    description="Which of the day's field photos an inspector sees first: parse failures, photos outside the "
    "reference on a drifted descriptor, the least confident answers, plus a seeded random share; deduplicated "
    "by perceptual hash against the champion's train/val/test photos, earlier queues and each other. Written "
    "at $RISKVA_HOME/field/review_queue/<day>.json (labelstudio_tasks sends it to the review desk).",
)
def review_queue(context: dg.AssetExecutionContext, config: ReviewQueueConfig, paths: DataRootResource,
                 mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core.feedback import review_queue as rq
    from riskva_core.feedback.inference_log import read_inference_log

    root = paths.layout()
    day = day_of(context)
    frame = read_inference_log(day_path(root, "inference_log", day, ".parquet"))
    flags_file = day_path(root, "drift", day) / "outlying.json"
    flags = json.loads(flags_file.read_text(encoding="utf-8")) if flags_file.is_file() else None
    reference_dir, _, _, _ = champion_reference(mlflow, paths, config.reference_dir)
    path = day_path(root, "review_queue", day, ".json")
    earlier = sorted(p for p in (root.field_dir / "review_queue").glob("*.json")
                     if p != path and not p.name.endswith(".sent.json"))
    queue = rq.build_review_queue(rq.candidates_from_log(frame, flags),
                                  known_photos(reference_dir) + rq.known_from_queues(earlier),
                                  rq.QueueConfig(size=config.size, random_share=config.random_share, seed=config.seed,
                                                 confidence_below=config.confidence_below))
    rq.write_queue(queue, path)
    rows = [[e.rank, e.reason, e.candidate.photo_sha256[:12], e.candidate.draft.get("风险等级", ""),
             "" if e.candidate.level_confidence is None else f"{e.candidate.level_confidence:.2f}"]
            for e in queue.entries[:20]]
    return dg.MaterializeResult(
        metadata={"dagster/row_count": len(queue.entries), "path": dg.MetadataValue.path(str(path)),
                  "counts": dg.MetadataValue.json(queue.counts()), "skipped": len(queue.skipped),
                  "first_in_queue": dg.MetadataValue.md(md_table(["rank", "reason", "photo", "风险等级", "confidence"],
                                                                 rows))},
        data_version=dg.DataVersion(hashlib.sha256(path.read_bytes()).hexdigest()[:16]))
