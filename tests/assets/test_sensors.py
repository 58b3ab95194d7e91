"""The datasets sensor registers exactly the new versions; the schedule trains the newest."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import dagster as dg

from riskva_assets.partitions import DATASET_VERSION
from riskva_assets.resources import DataRootResource
from riskva_assets.schedules import weekly_retrain
from riskva_assets.sensors import new_dataset_sensor


def _dataset(home: Path, version: str, mtime: int | None = None, csv: bool = True) -> None:
    folder = home / "datasets" / version
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if csv:
        path = folder / "metadata.csv"
        path.write_text("image_id,image_path\n", encoding="utf-8")
        if mtime is not None:
            os.utime(path, ns=(mtime, mtime))


def _sensor(instance: dg.DagsterInstance, home: Path):
    with dg.build_sensor_context(instance=instance, resources={"paths": DataRootResource(root=str(home))}) as ctx:
        return new_dataset_sensor(ctx)


def test_sensor_adds_only_new_versions_and_requests_their_data_assets(tmp_path: Path):
    home = tmp_path / "home"
    _dataset(home, "v1")
    _dataset(home, "v2")
    _dataset(home, "half_copied", csv=False)  # no metadata.csv yet: not a version
    (home / "datasets" / "notes.txt").write_text("x")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, ["v1"])
        result = _sensor(instance, home)
        assert isinstance(result, dg.SensorResult)
        (req,) = result.dynamic_partitions_requests
        assert req.partitions_def_name == DATASET_VERSION and list(req.partition_keys) == ["v2"]
        assert [r.partition_key for r in result.run_requests] == ["v2"]
        instance.add_dynamic_partitions(DATASET_VERSION, ["v2"])
        # Nothing new: skip. Then a third folder appears: only it is added.
        assert isinstance(_sensor(instance, home), dg.SkipReason)
        _dataset(home, "v3")
        result = _sensor(instance, home)
        assert list(result.dynamic_partitions_requests[0].partition_keys) == ["v3"]


def test_sensor_targets_only_the_data_assets():
    job = new_dataset_sensor.job
    assert job.name == "data_job"


def test_schedule_picks_the_newest_registered_version(tmp_path: Path):
    home = tmp_path / "home"
    _dataset(home, "a_old", mtime=1_000_000_000_000_000_000)
    _dataset(home, "b_new", mtime=1_000_000_500_000_000_000)
    _dataset(home, "c_unregistered", mtime=1_000_000_900_000_000_000)  # sensor has not seen it yet
    when = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.timezone.utc)
    with dg.instance_for_test() as instance:
        resources = {"paths": DataRootResource(root=str(home))}
        with dg.build_schedule_context(instance=instance, resources=resources, scheduled_execution_time=when) as ctx:
            assert isinstance(weekly_retrain(ctx), dg.SkipReason)
        instance.add_dynamic_partitions(DATASET_VERSION, ["a_old", "b_new"])
        with dg.build_schedule_context(instance=instance, resources=resources, scheduled_execution_time=when) as ctx:
            req = weekly_retrain(ctx)
        assert isinstance(req, dg.RunRequest) and req.partition_key == "b_new"
    assert weekly_retrain.job_name == "retrain_job"
