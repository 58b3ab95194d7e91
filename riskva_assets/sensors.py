"""Sensor: a new dataset folder becomes a partition and gets validated and prepared."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import dagster as dg

from .jobs import data_job
from .partitions import DATASET_VERSION
from .resources import DataRootResource


@dg.sensor(
    job=data_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches $RISKVA_HOME/datasets: each new folder with a metadata.csv is added as a "
    "dataset_version partition and its data assets (raw_metadata, sft_jsonl, sft_parquet) are requested.",
)
def new_dataset_sensor(context: dg.SensorEvaluationContext, paths: DataRootResource) -> dg.SensorResult | dg.SkipReason:
    on_disk = paths.layout().dataset_versions()
    known = set(context.instance.get_dynamic_partitions(DATASET_VERSION))
    new = [v for v in on_disk if v not in known]
    if not new:
        return dg.SkipReason(f"no new dataset folder ({len(on_disk)} on disk, all registered)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=v, run_key=f"data-{v}") for v in new],
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(DATASET_VERSION, new)],
    )
