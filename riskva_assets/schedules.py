"""Schedule: retrain the whole chain on the newest dataset version, but only when something changed.

Every week (by default) the schedule compares the newest registered dataset version with the
lineage of the serving champion (its MLflow version tags, written by registered_model):

- the data version of the newest version's validated data (raw_metadata),
- the code version of the training code (lora_adapter's source hash),
- the base model (RISKVA_BASE_MODEL, or the demo model).

If all three equal the champion's, retraining would reproduce the champion: it returns a
SkipReason that says so. The same holds for the last *attempted* challenger (the newest model
version with a promotion decision, promoted or not): a challenger that was rejected or left
inconclusive would be retrained, merged, registered and evaluated again with the same inputs
every week, so the schedule skips and names that version and its decision. Otherwise it
requests retrain_job and names what changed in the run's tags. With no champion, or data not
yet validated, it retrains.
"""
# No `from __future__ import annotations`: dagster reads the context annotations at runtime.

import os
from typing import Optional

import dagster as dg

from .asset_metadata import CODE_VERSIONS
from .jobs import retrain_job
from .partitions import DATASET_VERSION
from .resources import DataRootResource, MlflowResource, TrainingLauncher

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00
CRON = os.environ.get("RISKVA_RETRAIN_CRON", DEFAULT_CRON)


def newest_registered_version(instance: dg.DagsterInstance, paths: DataRootResource) -> str | None:
    """The newest version on disk that is also a registered partition (the sensor registers them)."""
    root = paths.layout()
    known = set(instance.get_dynamic_partitions(DATASET_VERSION))
    candidates = [v for v in root.dataset_versions() if v in known]
    if not candidates:
        return None
    return max(candidates, key=lambda v: (root.dataset_csv(v).stat().st_mtime_ns, v))


def latest_data_version(instance: dg.DagsterInstance, asset: str, partition: str) -> Optional[str]:
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1)
    if not result.records or result.records[0].asset_materialization is None:
        return None
    return (result.records[0].asset_materialization.tags or {}).get("dagster/data_version")


def lineage_changes(current: dict[str, Optional[str]], champion_tags: dict[str, str]) -> list[str]:
    """What differs between the current inputs and the champion's lineage tags ("" when unknown)."""
    changes = []
    for tag, value in current.items():
        before = champion_tags.get(tag)
        if value is None or before != value:
            changes.append(f"{tag}: {before or 'unknown'} → {value or 'unknown'}")
    return changes


def last_attempted(registry) -> Optional[tuple[str, dict[str, str]]]:
    """(version, tags) of the newest model version that went through promotion (any decision), if any."""
    versions = registry.client().search_model_versions(f"name='{registry.model_name}'")
    attempted = [v for v in versions if (v.tags or {}).get("promotion.decision")]
    if not attempted:
        return None
    newest = max(attempted, key=lambda v: int(v.version))
    return str(newest.version), dict(newest.tags or {})


@dg.schedule(
    job=retrain_job,
    cron_schedule=CRON,
    execution_timezone=os.environ.get("RISKVA_RETRAIN_TIMEZONE", "UTC"),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Retrain on the newest dataset version when its data version, the training code version or "
    f"the base model differs from the champion's lineage; otherwise skip and say so. Cron from "
    f"$RISKVA_RETRAIN_CRON (default {DEFAULT_CRON!r}).",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext, paths: DataRootResource, mlflow: MlflowResource,
                   launcher: TrainingLauncher) -> dg.RunRequest | dg.SkipReason:
    from riskva_core.registry.client import ALIAS_CHAMPION

    version = newest_registered_version(context.instance, paths)
    if version is None:
        return dg.SkipReason("no registered dataset version to train on")
    registry = mlflow.registry()
    champion = registry.alias_version(ALIAS_CHAMPION)
    current = {
        "data_version.raw_metadata": latest_data_version(context.instance, "raw_metadata", version),
        "code_version.lora_adapter": CODE_VERSIONS["lora_adapter"],
        "base_model": launcher.base_model_path or "demo",
    }
    inputs = ", ".join(f"{k}={v}" for k, v in current.items())
    if champion is None:
        changes = ["no champion yet"]
    else:
        changes = lineage_changes(current, dict(registry.get_version(champion).tags))
        if not changes:
            return dg.SkipReason(
                f"newest dataset version {version} has the champion v{champion}'s data version, training code "
                f"version and base model ({inputs}): nothing to retrain")
    attempt = last_attempted(registry)
    if attempt is not None and not lineage_changes(current, attempt[1]):
        number, tags = attempt
        return dg.SkipReason(
            f"newest dataset version {version} has the lineage of v{number}, the last attempted challenger "
            f"(decision: {tags.get('promotion.decision')}: {tags.get('promotion.reason', '')[:300]}), "
            f"({inputs}): retraining would reproduce it; change the data, training code or base model, or "
            "promote it by hand")
    stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
    return dg.RunRequest(partition_key=version, run_key=f"retrain-{version}-{stamp}",
                         tags={"riskva/trigger": "schedule", "riskva/retrain_because": "; ".join(changes)[:1000]})
