"""The review desk: Label Studio as a resource, the day's queue sent as tasks with the champion's drafts
as predictions, a sensor that reports review progress, and reviewed_dataset, which turns the
inspectors' verdicts into the next dataset version (the dataset sensor then takes it from there).

Label Studio's address and token come from the environment (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, read through ``dg.EnvVar`` so the UI shows the variable's name, never its
value); ``LABEL_STUDIO_DOCUMENT_ROOT`` is the server's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``
(default: the data root, which holds the field photos). ``make labelstudio`` starts one.
"""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from riskva_core.errors import RiskvaError

from .asset_metadata import CODE_VERSIONS, md_table
from .feedback_assets import FEEDBACK, day_of, day_path, field_day
from .resources import DataRootResource, MlflowResource

PROJECT_TITLE = "RisKVA field review"


class LabelStudioResource(dg.ConfigurableResource):
    """Label Studio over its HTTP API (riskva_core/feedback/labelstudio.py). The token is a secret:
    set it from the environment (``dg.EnvVar``); it is never logged."""

    url: str = Field(default="http://127.0.0.1:8089", description="Label Studio's address ($LABEL_STUDIO_URL)")
    api_key: str = Field(default="", repr=False, description="API token ($LABEL_STUDIO_API_KEY): a legacy token or "
                         "a personal access token")
    document_root: str = Field(default="", description="The server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; empty: "
                               "the data root")
    project_title: str = Field(default=PROJECT_TITLE, description="The review project, created from code if absent")

    def client(self) -> Any:
        from riskva_core.feedback.labelstudio import LabelStudio, LabelStudioSettings

        if not self.api_key:
            raise RiskvaError("Label Studio needs $LABEL_STUDIO_API_KEY; the review queue is kept for the next try")
        return LabelStudio(LabelStudioSettings(self.url.rstrip("/"), self.api_key))

    def root(self, paths: DataRootResource) -> Path:
        return Path(self.document_root) if self.document_root else paths.layout().root

    def project(self, client: Any) -> int:
        return client.ensure_project(self.project_title, "Field photos answered by the champion: accept or correct "
                                     "its draft (风险, 风险等级, 纠正和预防建议, 缺陷描述).")


@dg.asset(
    partitions_def=field_day,
    group_name=FEEDBACK,
    kinds={"labelstudio"},
    deps=["review_queue"],
    code_version=CODE_VERSIONS["labelstudio_tasks"],
    description="The day's review queue on the desk: Label Studio tasks (the photo, served from the data root's "
    "field photos through a local storage) with the champion's draft as the prediction (model version, and the "
    "风险等级 confidence as its score, so uncertainty sampling shows the least sure first). The project is "
    "created from code. Sent once: a marker beside the queue records it; a failure (unreachable, token refused) "
    "is a one-line error and the queue is kept for the next try.",
)
def labelstudio_tasks(context: dg.AssetExecutionContext, paths: DataRootResource,
                      labelstudio: LabelStudioResource) -> dg.MaterializeResult:
    from riskva_core.feedback.labelstudio import send_queue, sent_marker

    root = paths.layout()
    queue = day_path(root, "review_queue", day_of(context), ".json")
    if not queue.is_file():
        raise RiskvaError(f"{queue} does not exist: materialize review_queue for {context.partition_key} first")
    client = labelstudio.client()
    project = labelstudio.project(client)
    client.ensure_local_storage(project, root.field_photos)
    sent = send_queue(client, project, queue, labelstudio.root(paths))
    marker = json.loads(sent_marker(queue).read_text(encoding="utf-8"))
    progress = client.progress(project)
    return dg.MaterializeResult(
        metadata={"tasks_sent": sent, "tasks_in_queue_sent": int(marker.get("tasks", 0)), "project": project,
                  "project_url": dg.MetadataValue.url(f"{labelstudio.url.rstrip('/')}/projects/{project}/data"),
                  "tasks_on_desk": progress["tasks"], "reviewed": progress["reviewed"]},
        data_version=dg.DataVersion(hashlib.sha256(queue.read_bytes()).hexdigest()[:16]))


class ReviewedDatasetConfig(dg.Config):
    previous_version: str = Field(default="", description="The dataset version the reviewed photos are added to; "
                                  "empty: the champion's dataset_version, else the newest version")
    new_version: str = Field(default="", description="The new version's name; empty: <previous>-field-<UTC time>")
    min_reviews: int = Field(default=20, description="Fewer usable reviews: nothing is written (the sensor waits)")


def _previous_version(config: ReviewedDatasetConfig, paths: DataRootResource, mlflow: MlflowResource) -> str:
    if config.previous_version:
        return config.previous_version
    registry = mlflow.registry()
    champion = registry.alias_version("champion")
    if champion is not None:
        tag = str(registry.get_version(champion).tags.get("dataset_version") or "")
        if tag and paths.layout().dataset_csv(tag).is_file():
            return tag
    newest = paths.layout().newest_dataset_version()
    if newest is None:
        raise RiskvaError("no dataset version to add reviewed photos to (set previous_version)")
    return newest


def log_expectations(registry: Any, reviews: list) -> int:
    """Each reviewed answer on its trace, as MLflow expectations (one per field, by the reviewer), so the
    trace shows draft against correction. Traces that are gone are skipped; returns how many were logged."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    registry.activate()
    logged = 0
    for review in reviews:
        if not review.trace_id:
            continue
        source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=review.reviewer or "inspector")
        try:
            for field, value in review.final().items():
                mlflow.log_expectation(trace_id=review.trace_id, name=field, value=value, source=source,
                                       metadata={"changed": str(field in review.changed_fields()),
                                                 "task_id": str(review.task_id)})
            logged += 1
        except Exception as exc:  # noqa: BLE001 - a purged trace must not stop the dataset
            registry_log = f"{type(exc).__name__}: {exc}"
            dg.get_dagster_logger().warning(f"trace {review.trace_id}: expectation not logged ({registry_log})")
    return logged


@dg.asset(
    group_name=FEEDBACK,
    kinds={"labelstudio", "csv", "mlflow"},
    deps=["labelstudio_tasks"],
    code_version=CODE_VERSIONS["reviewed_dataset"],
    description="The inspectors' reviews become the next dataset version: the earlier version's rows and images "
    "plus one row per reviewed photo (the seed's CSV format), written atomically under $RISKVA_HOME/datasets/"
    "<new version>/ with provenance.json (reviewer, time, the model's draft, the fields changed). The dataset "
    "sensor then registers the version and starts validation → training → evaluation → promotion. Each review "
    "is logged on its trace as MLflow expectations, and the champion's field accuracy (drafts accepted "
    "unchanged, per field, Wilson 95% interval) is shown here and logged as MLflow metrics on the version.",
)
def reviewed_dataset(context: dg.AssetExecutionContext, config: ReviewedDatasetConfig, paths: DataRootResource,
                     mlflow: MlflowResource, labelstudio: LabelStudioResource) -> dg.MaterializeResult:
    from riskva_core.feedback.field_accuracy import METRIC_NAMES, field_accuracy
    from riskva_core.feedback.labelstudio import reviews_from_tasks
    from riskva_core.feedback.reviewed_dataset import ReviewedDatasetConfig as Spec
    from riskva_core.feedback.reviewed_dataset import write_reviewed_dataset

    root = paths.layout()
    client = labelstudio.client()
    completed = client.completed_tasks(labelstudio.project(client))
    reviews = reviews_from_tasks(completed)
    previous = _previous_version(config, paths, mlflow)
    new = config.new_version or f"{previous}-field-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    result = write_reviewed_dataset(Spec(previous_csv=root.dataset_csv(previous), previous_root=root.dataset_dir(previous),
                                         reviews=reviews, output_dir=root.dataset_dir(new),
                                         min_reviews=config.min_reviews))
    registry = mlflow.registry()
    expectations = log_expectations(registry, reviews)
    accuracy = field_accuracy(reviews)
    rows = []
    for version, shares in accuracy.by_version.items():
        for field, share in shares.items():
            rows.append([version, field, f"{share.accepted}/{share.total}",
                         "" if share.share is None else f"{share.share:.1%} [{share.low:.1%}, {share.high:.1%}]"])
        if version.isdigit():
            try:
                registry.log_metrics(version, accuracy.metrics(version), prefix="")
            except Exception as exc:  # noqa: BLE001 - a deleted version: shown here, not logged there
                context.log.warning(f"field accuracy not logged on version {version}: {type(exc).__name__}: {exc}")
    metadata: dict[str, Any] = {
        "dataset_version": new, "previous_version": previous, "csv": dg.MetadataValue.path(str(result.csv_path)),
        "rows_previous": result.rows_previous, "rows_added": result.rows_added, "reviews": len(reviews),
        # What review_progress_sensor counts as used: the desk's reviewed tasks this version was made from.
        "reviewed_on_desk": len(completed),
        "expectations_logged": expectations, "skipped": len(result.skipped),
        "changed_fields": dg.MetadataValue.json(result.changed),
        "field_accuracy": dg.MetadataValue.md(md_table(["model version", "field", "accepted", "share [95% CI]"], rows)),
    }
    for version, shares in accuracy.by_version.items():
        for field, share in shares.items():
            if share.share is not None:
                metadata[f"field_accept.v{version}.{METRIC_NAMES[field]}"] = float(share.share)
    return dg.MaterializeResult(
        metadata=metadata,
        data_version=dg.DataVersion(hashlib.sha256(result.csv_path.read_bytes()).hexdigest()[:16]))


review_job = dg.define_asset_job("review_job", selection=["reviewed_dataset"],
                                 description="Reviewed photos → the next dataset version (started by the sensor)")
field_job = dg.define_asset_job("field_job", selection=["inference_log", "production_drift", "review_queue",
                                                        "labelstudio_tasks"], partitions_def=field_day,
                                description="The day's traces → drift → review queue → tasks on the desk")
daily_field = dg.build_schedule_from_partitioned_job(field_job, hour_of_day=1, minute_of_hour=0)


class ReviewProgressConfig:
    min_reviews = 20


@dg.sensor(
    job=review_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Polls Label Studio: reports review progress as AssetObservations of labelstudio_tasks (tasks, "
    "reviewed, new since the last dataset) and requests reviewed_dataset once $RISKVA_MIN_REVIEWS (default 20) "
    "reviews are new since the last reviewed_dataset that materialized (a failed run uses none up: the next "
    "review requests it again). Unreachable or a refused token: skipped with the reason.",
)
def review_progress_sensor(context: dg.SensorEvaluationContext, labelstudio: LabelStudioResource):
    import os

    min_reviews = int(os.environ.get("RISKVA_MIN_REVIEWS", ReviewProgressConfig.min_reviews))
    try:
        client = labelstudio.client()
        project = labelstudio.project(client)
        progress = client.progress(project)
    except RiskvaError as exc:
        return dg.SkipReason(str(exc))
    # Counted from the last dataset that was MADE, not from the last request: a cursor moved on request
    # would swallow the reviews of a run that then failed until min_reviews more came in. The run key
    # keeps one run per desk count (a failed one is not retried in a loop; the next review retries it).
    last = context.instance.get_latest_materialization_event(dg.AssetKey("reviewed_dataset"))
    entry = last.asset_materialization.metadata.get("reviewed_on_desk") if last and last.asset_materialization else None
    used = int(entry.value) if entry is not None else 0
    fresh = progress["reviewed"] - used
    observation = dg.AssetObservation(asset_key="labelstudio_tasks", metadata={
        "tasks_on_desk": progress["tasks"], "reviewed": progress["reviewed"], "new_since_last_dataset": fresh,
        "min_reviews": min_reviews, "project": project})
    if fresh < min_reviews:
        return dg.SensorResult(asset_events=[observation], skip_reason=dg.SkipReason(
            f"{fresh} new reviews of {min_reviews} needed ({progress['reviewed']}/{progress['tasks']} reviewed)"))
    run_config = {"ops": {"reviewed_dataset": {"config": {"min_reviews": min_reviews}}}}
    return dg.SensorResult(asset_events=[observation],
                           run_requests=[dg.RunRequest(run_key=f"reviewed-{progress['reviewed']}",
                                                       run_config=run_config)])
