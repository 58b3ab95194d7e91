"""The asset graph materialized in-process on a temporary data root and Dagster instance."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import dagster as dg
import pytest

from riskva_assets.assets import VERSION_ASSETS, DATA_ASSETS
from riskva_assets.partitions import DATASET_VERSION
from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher
from riskva_core.synth.generate import synth

VERSION = "v1"


def _resources(home: Path, **launcher) -> dict:
    paths = DataRootResource(root=str(home))
    return {"paths": paths, "mlflow": MlflowResource(paths=paths), "launcher": TrainingLauncher(**launcher)}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    synth(tmp_path / "home" / "datasets" / VERSION, num_images=24, seed=0, image_size=(128, 96), num_workers=1)
    return tmp_path / "home"


def _events(result, kind: str, key: str) -> list:
    return [e for e in result.all_events if e.event_type_value == kind and key in str(e.asset_key or "")]


def test_data_assets_materialize_with_metadata_and_check(home: Path):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        result = dg.materialize([a for a in VERSION_ASSETS if a.key.path[0] in DATA_ASSETS], partition_key=VERSION,
                                instance=instance, resources=_resources(home))
        assert result.success
        raw = result.asset_materializations_for_node("raw_metadata")[0]
        assert raw.metadata["dagster/row_count"].value == 24 and raw.metadata["rows_rejected"].value == 0
        assert "严重" in raw.metadata["level_distribution"].value
        assert raw.metadata["dagster/column_schema"].value.columns[1].name == "image_path"
        checks = {(c.asset_key.path[-1], c.check_name): c.passed for c in result.get_asset_check_evaluations()}
        assert checks == {("raw_metadata", "schema_valid"): True, ("sft_jsonl", "no_near_duplicate_leak"): True,
                          ("sft_parquet", "no_near_duplicate_leak"): True}
        for key, fmt in (("sft_jsonl", "jsonl"), ("sft_parquet", "parquet")):
            (mat,) = result.asset_materializations_for_node(key)
            sizes = mat.metadata["split_sizes"].value
            assert sum(sizes.values()) == 24 and sizes["test"] > 0
            groups = mat.metadata["split_groups"].value  # photos of one defect: one group, one split
            assert 0 < groups["test"] <= sizes["test"] and sum(groups.values()) <= 24
            assert mat.metadata["path"].value == str(home / "prepared" / VERSION / fmt)
            assert len(mat.metadata["preview"].value.records) == 5
            assert mat.tags["dagster/data_version"] == mat.metadata["fingerprint"].value[:16]
        # Same data → same data versions on a second run (content hashes, not timestamps).
        again = dg.materialize([a for a in VERSION_ASSETS if a.key.path[0] in DATA_ASSETS], partition_key=VERSION,
                               instance=instance, resources=_resources(home))
        def versions(res):
            return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.tags["dagster/data_version"]
                    for e in res.get_asset_materialization_events()}

        assert versions(again) == versions(result) and len(versions(result)) == 3


def test_failing_schema_check_blocks_every_downstream_asset(home: Path):
    csv = home / "datasets" / VERSION / "metadata.csv"
    lines = csv.read_text(encoding="utf-8").splitlines()
    # Half the rows get an ambiguous level: far above the 10% reject limit.
    bad = [lines[0]] + [ln.replace("严重", "较严重").replace("轻微", "较严重") for ln in lines[1:]]
    csv.write_text("\n".join(bad) + "\n", encoding="utf-8")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        result = dg.materialize(VERSION_ASSETS, partition_key=VERSION, instance=instance,
                                resources=_resources(home), raise_on_error=False)
        assert not result.success
        (check,) = result.get_asset_check_evaluations()
        assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
        assert check.metadata["reject_ratio"].value > 0.1
        raw = result.asset_materializations_for_node("raw_metadata")[0]
        assert "较严重" in raw.metadata["rejected_rows"].value
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert materialized == {"raw_metadata"}
        started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
        assert started == {"raw_metadata"}  # nothing downstream even started
        failed = {e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
        assert failed == {"raw_metadata"}


@pytest.mark.slow
def test_whole_graph_with_tiny_model_two_ranks(home: Path):
    """Every asset for one partition; training through the real Pipes subprocess on 2 CPU ranks."""
    import mlflow
    import pandas as pd

    from riskva_core.paths import DataRoot
    from riskva_core.registry.client import Registry
    from riskva_core.data.samples import read_samples

    run_config = dg.RunConfig(ops={
        "base_model": {"config": {"size": "tiny"}},
        "lora_adapter": {"config": {"recipe": "demo", "max_steps": 2, "per_device_train_batch_size": 2}},
        "registered_model": {"config": {"max_new_tokens": 16, "batch_size": 4}},
        "champion_promotion": {"config": {"min_parse_rate": 0.0, "n_resamples": 200}},
    })
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        result = dg.materialize(VERSION_ASSETS, partition_key=VERSION, instance=instance, run_config=run_config,
                                resources=_resources(home, num_processes=2, termination_timeout_s=60))
        assert result.success
        done = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
        assert sorted(done) == sorted(a.key.to_user_string() for a in VERSION_ASSETS)  # each exactly once
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert set(checks) == {"schema_valid", "no_near_duplicate_leak", "merge_equivalent", "meets_thresholds"}
        assert checks["merge_equivalent"].passed and "tolerance" in checks["merge_equivalent"].description
        assert "thresholds" in checks["meets_thresholds"].metadata
        # Pipes: rank 0's final report is the one materialization, with the world size it saw.
        (lora,) = result.asset_materializations_for_node("lora_adapter")
        assert lora.metadata["world_size"].value == 2 and lora.metadata["reported_by_rank"].value == 0
        assert lora.metadata["step"].value == 2
        assert (home / "models" / VERSION / "train" / "adapter" / "adapter_model.safetensors").is_file()
        (reg,) = result.asset_materializations_for_node("registered_model")
        version = reg.metadata["model_version"].value
        (ev,) = result.asset_materializations_for_node("evaluation_report")
        assert "parse_rate" in ev.metadata and Path(ev.metadata["report_html"].value).is_file()
        assert ev.metadata["parse_rate"].value == round(ev.metadata["parse_rate"].value, 3)
        table = ev.metadata["confusion_matrix"].value
        assert [c.name for c in table.schema.columns] == ["truth \\ predicted", "轻微", "中等", "严重", "INVALID"]
        assert [r.data["truth \\ predicted"] for r in table.records] == ["轻微", "中等", "严重", "INVALID"]
        (promo,) = result.asset_materializations_for_node("champion_promotion")
        assert promo.metadata["thresholds"].value["margin"] == 0.02
    registry = Registry.under(DataRoot(home))
    assert registry.alias_version("challenger") == version
    tags = registry.get_version(version).tags
    assert tags["dataset_version"] == VERSION
    assert {"data_version.raw_metadata", "data_version.sft_jsonl", "data_version.merged_model"} <= set(tags)
    assert tags["dagster_run_id"] == result.run_id and "eval.parse_rate" in tags
    assert tags["code_version.lora_adapter"] and tags["base_model"] == "demo"
    assert tags["promotion.decision"] in {"promoted", "rejected"}
    assert json.loads(tags["promotion.thresholds"])["min_parse_rate"] == 0.0
    registry.activate()
    model = mlflow.pyfunc.load_model("models:/riskva@challenger")
    image = read_samples(home / "prepared" / VERSION / "parquet", "test")[0].image_bytes
    out = model.predict(pd.DataFrame({"image": [image]}))
    assert len(out) == 1 and isinstance(out["raw_output"][0], str)


def test_registering_twice_makes_one_model_version(tmp_path: Path):
    """A retry or re-execution of registered_model reuses the version of the same merged model, keeps the
    lineage tags it was registered with and adds its own run id; tags come from the adapter's record."""
    from model_fixtures import make_parquet_twin, make_prepared_dataset, make_tiny_model

    from riskva_assets.asset_metadata import CODE_VERSIONS
    from riskva_core.launch.resume import lineage_tags
    from riskva_core.paths import DataRoot
    from riskva_core.registry.client import Registry

    home = tmp_path / "home"
    root = DataRoot(home)
    jsonl = make_prepared_dataset(root.prepared_dir(VERSION, "jsonl"), n=6)
    make_parquet_twin(jsonl, root.prepared_dir(VERSION, "parquet"))
    merged = make_tiny_model(root.merged_dir(VERSION), jsonl)
    adapter = root.train_dir(VERSION) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter v2 weights")
    current = hashlib.sha256(b"adapter v2 weights").hexdigest()
    run_config = dg.RunConfig(ops={"registered_model": {"config": {"max_new_tokens": 4, "batch_size": 1}}})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])

        def register(**kw):
            return dg.materialize(VERSION_ASSETS, selection=["registered_model"], partition_key=VERSION, instance=instance,
                                  run_config=run_config, resources=_resources(home), **kw)

        # Planted stale evidence: a folder merged from an older adapter (the newest merge was refused and
        # wrote nothing), or one whose merge check failed, is never registered.
        # The adapter's own record, as lora_adapter writes it and merged_model copies it into its report.
        record = {"data_versions": {"sft_jsonl": "d1"}, "code_versions": {"lora_adapter": CODE_VERSIONS["lora_adapter"]},
                  "base_model": {"name": "demo", "identity": "/base"}, "seed": 0, "recipe": "demo",
                  "adapter_version": "ad1", "run_identity": "r1", "dataset_version": VERSION, "step": 2}
        old_code = {**record, "code_versions": {"lora_adapter": "0ld"}}
        for report, message in (
                ({"equivalent": True, "adapter_sha256": "0" * 64, "adapter_lineage": record},
                 "not from the current adapter"),
                ({"equivalent": False, "reason": "logits differ", "adapter_sha256": current, "adapter_lineage": record},
                 "merge check failed (logits differ)"),
                ({"equivalent": True, "adapter_sha256": current}, "carries no adapter lineage record"),
                ({"equivalent": True, "adapter_sha256": current, "adapter_lineage": old_code},
                 f"lora_adapter code version 0ld vs {CODE_VERSIONS['lora_adapter']} (recorded vs now): "
                 "materialize lora_adapter")):
            (merged / "merge_report.json").write_text(json.dumps(report), encoding="utf-8")
            with pytest.raises(dg.Failure, match=re.escape(message)):
                register()
        assert list(Registry.under(root).client().search_model_versions("name='riskva'")) == []
        (merged / "merge_report.json").write_text(json.dumps({"equivalent": True, "adapter_sha256": current,
                                                              "adapter_lineage": record, "verdict": "equivalent"}),
                                                  encoding="utf-8")
        runs = [register() for _ in range(2)]
    first, second = (r.asset_materializations_for_node("registered_model")[0].metadata for r in runs)
    assert first["model_version"].value == second["model_version"].value == "1"
    assert not first["reused_existing_version"].value and second["reused_existing_version"].value
    registry = Registry.under(root)
    assert [str(v.version) for v in registry.client().search_model_versions("name='riskva'")] == ["1"]
    tags = registry.get_version("1").tags
    assert {k: tags[k] for k in lineage_tags(record)} == lineage_tags(record) and tags["merge.verdict"] == "equivalent"
    assert tags["base_model"] == "demo" and tags["code_version.lora_adapter"] == CODE_VERSIONS["lora_adapter"]
    # The version keeps the run that registered it; the re-execution is added, never written over it.
    assert tags["dagster_run_id"] == runs[0].run_id and tags[f"dagster_run.{runs[0].run_id}"] == "registered"
    assert tags[f"dagster_run.{runs[1].run_id}"] == "reused" and registry.alias_version("challenger") == "1"
