"""Schedule: retrain the whole chain on the newest dataset version (weekly by default)."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import os

import dagster as dg

from .jobs import retrain_job
from .partitions import DATASET_VERSION
from .resources import DataRootResource

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


@dg.schedule(
    job=retrain_job,
    cron_schedule=CRON,
    execution_timezone=os.environ.get("RISKVA_RETRAIN_TIMEZONE", "UTC"),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Retrain on the newest dataset version; cron from $RISKVA_RETRAIN_CRON (default {DEFAULT_CRON!r}).",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext, paths: DataRootResource) -> dg.RunRequest | dg.SkipReason:
    version = newest_registered_version(context.instance, paths)
    if version is None:
        return dg.SkipReason("no registered dataset version to train on")
    stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
    return dg.RunRequest(partition_key=version, run_key=f"retrain-{version}-{stamp}", tags={"riskva/trigger": "schedule"})
