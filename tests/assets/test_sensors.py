"""The datasets sensor registers new versions and retries incomplete ones; the schedule retrains
only when the newest version's lineage differs from the champion's."""
from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import dagster as dg

from riskva_assets.asset_metadata import CODE_VERSIONS
from riskva_assets.assets import VERSION_ASSETS, DATA_ASSETS
from riskva_assets.partitions import DATASET_VERSION
from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher
from riskva_assets.schedules import weekly_retrain
from riskva_assets.sensors import new_dataset_sensor
from riskva_core.paths import DataRoot
from riskva_core.registry.client import Registry
from riskva_core.synth.generate import synth


def _dataset(home: Path, version: str, mtime: int | None = None, csv: bool = True) -> None:
    folder = home / "datasets" / version
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if csv:
        path = folder / "metadata.csv"
        path.write_text("image_id,image_path\n", encoding="utf-8")
        if mtime is not None:
            os.utime(path, ns=(mtime, mtime))


def _sensor(instance: dg.DagsterInstance, home: Path, cursor: str | None = None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"paths": DataRootResource(root=str(home))}) as ctx:
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
        (req,) = result.dynamic_partitions_requests
        assert req.partitions_def_name == DATASET_VERSION and list(req.partition_keys) == ["v2"]
        assert [r.partition_key for r in result.run_requests] == ["v2"]
        instance.add_dynamic_partitions(DATASET_VERSION, ["v2"])
        # Nothing new or changed: skip. Then a third folder appears: only it is added.
        again = _sensor(instance, home, result.cursor)
        assert not again.run_requests and "no new or changed" in again.skip_reason.skip_message
        _dataset(home, "v3")
        result = _sensor(instance, home, again.cursor)
        assert list(result.dynamic_partitions_requests[0].partition_keys) == ["v3"]


def test_csv_first_images_later_gives_one_successful_run(tmp_path: Path):
    """The CSV lands before its images: the first run fails validation; once the images are there the
    folder's fingerprint changes, the sensor requests it again (new run key), and that run succeeds."""
    home = tmp_path / "home"
    folder = home / "datasets" / "v1"
    synth(folder, num_images=9, seed=0, image_size=(96, 72), num_workers=1)
    shutil.move(folder / "images", tmp_path / "images_in_transit")
    resources = {"paths": DataRootResource(root=str(home))}
    data_assets = [a for a in VERSION_ASSETS if a.key.path[0] in DATA_ASSETS]
    with dg.instance_for_test() as instance:
        first = _sensor(instance, home)
        (req1,) = first.run_requests
        instance.add_dynamic_partitions(DATASET_VERSION, ["v1"])
        run1 = dg.materialize(data_assets, partition_key="v1", instance=instance, resources=resources,
                              raise_on_error=False)
        assert not run1.success and not run1.get_asset_check_evaluations()[0].passed
        assert not _sensor(instance, home, first.cursor).run_requests  # still incomplete: no retry storm
        shutil.move(tmp_path / "images_in_transit", folder / "images")
        second = _sensor(instance, home, first.cursor)
        (req2,) = second.run_requests
        assert req2.partition_key == "v1" and req2.run_key != req1.run_key
        assert not second.dynamic_partitions_requests  # the partition exists already
        run2 = dg.materialize(data_assets, partition_key="v1", instance=instance, resources=resources)
        assert run2.success and run2.get_asset_check_evaluations()[0].passed
        assert not _sensor(instance, home, second.cursor).run_requests


def test_sensor_targets_only_the_data_assets():
    assert new_dataset_sensor.job.name == "data_job"


def _schedule(instance, home: Path, when: dt.datetime, base_model: str = ""):
    paths = DataRootResource(root=str(home))
    resources = {"paths": paths, "mlflow": MlflowResource(paths=paths),
                 "launcher": TrainingLauncher(base_model_path=base_model)}
    with dg.build_schedule_context(instance=instance, resources=resources, scheduled_execution_time=when) as ctx:
        return weekly_retrain(ctx)


def _validated(instance, partition: str, data_version: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(
        "raw_metadata", partition=partition, tags={"dagster/data_version": data_version}))


def _empty_registry(home: Path):
    registry = Registry.under(DataRoot(home))
    registry.activate()
    registry.client().create_registered_model(registry.model_name)
    return registry, registry.client()


def test_schedule_retrains_the_newest_version_only_when_its_lineage_changed(tmp_path: Path):
    home = tmp_path / "home"
    _dataset(home, "a_old", mtime=1_000_000_000_000_000_000)
    _dataset(home, "b_new", mtime=1_000_000_500_000_000_000)
    _dataset(home, "c_unregistered", mtime=1_000_000_900_000_000_000)  # sensor has not seen it yet
    when = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.timezone.utc)
    assert weekly_retrain.job_name == "retrain_job"
    assert weekly_retrain.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.instance_for_test() as instance:
        assert isinstance(_schedule(instance, home, when), dg.SkipReason)
        instance.add_dynamic_partitions(DATASET_VERSION, ["a_old", "b_new"])
        req = _schedule(instance, home, when)  # no champion yet
        assert isinstance(req, dg.RunRequest) and req.partition_key == "b_new"
        assert req.tags["riskva/retrain_because"] == "no champion yet"
        # b_new's validated data has data version D; a champion (a real MLflow version) trained on it.
        _validated(instance, "b_new", "D")
        registry, client = _empty_registry(home)
        mv = client.create_model_version(registry.model_name, source=str(tmp_path))
        registry.set_tags(mv.version, {"data_version.raw_metadata": "D", "base_model": "demo",
                                       "code_version.lora_adapter": CODE_VERSIONS["lora_adapter"]})
        registry.set_alias("champion", mv.version)
        skip = _schedule(instance, home, when)
        assert isinstance(skip, dg.SkipReason) and "nothing to retrain" in skip.skip_message
        assert "champion v1" in skip.skip_message and "data_version.raw_metadata=D" in skip.skip_message
        # Each of the three inputs, changed alone, triggers a retrain naming it.
        changed_base = _schedule(instance, home, when, base_model="Qwen/Qwen2.5-VL-7B-Instruct")
        assert isinstance(changed_base, dg.RunRequest)
        assert changed_base.tags["riskva/retrain_because"] == "base_model: demo → Qwen/Qwen2.5-VL-7B-Instruct"
        registry.set_tags(mv.version, {"code_version.lora_adapter": "older-training-code"})
        assert "code_version.lora_adapter" in _schedule(instance, home, when).tags["riskva/retrain_because"]
        registry.set_tags(mv.version, {"code_version.lora_adapter": CODE_VERSIONS["lora_adapter"]})
        _validated(instance, "b_new", "E")
        assert _schedule(instance, home, when).tags["riskva/retrain_because"] == "data_version.raw_metadata: D → E"


def test_schedule_skips_when_the_newest_lineage_is_the_last_attempted_challengers(tmp_path: Path):
    home = tmp_path / "home"
    _dataset(home, "v1", mtime=1_000_000_000_000_000_000)
    when = dt.datetime(2026, 1, 12, 3, 0, tzinfo=dt.timezone.utc)
    lineage = {"data_version.raw_metadata": "D", "base_model": "demo",
               "code_version.lora_adapter": CODE_VERSIONS["lora_adapter"]}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, ["v1"])
        _validated(instance, "v1", "D")
        registry, client = _empty_registry(home)
        champ = client.create_model_version(registry.model_name, source=str(tmp_path))
        registry.set_tags(champ.version, {**lineage, "data_version.raw_metadata": "C", "promotion.decision": "promoted"})
        registry.set_alias("champion", champ.version)
        chal = client.create_model_version(registry.model_name, source=str(tmp_path))
        registry.set_tags(chal.version, lineage)  # registered, not yet through promotion: not "attempted"
        assert isinstance(_schedule(instance, home, when), dg.RunRequest)
        registry.set_tags(chal.version, {"promotion.decision": "inconclusive",
                                         "promotion.reason": "inconclusive, champion v1 stays: ≈1868 photos"})
        skip = _schedule(instance, home, when)
        assert isinstance(skip, dg.SkipReason)
        assert "lineage of v2, the last attempted challenger (decision: inconclusive" in skip.skip_message
        _validated(instance, "v1", "E")  # new data: retrain
        req = _schedule(instance, home, when)
        assert isinstance(req, dg.RunRequest) and req.tags["riskva/retrain_because"] == "data_version.raw_metadata: C → E"
