"""Lineage from the weights, through Dagster: an adapter carries its own record, a failed retrain
leaves nothing to merge or register under the new data or code version, and the registered version
is tagged from the record of the weights it holds."""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from riskva_assets.assets import VERSION_ASSETS, DATA_ASSETS
from riskva_assets.partitions import DATASET_VERSION
from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher
from riskva_core.synth.generate import synth

VERSION = "v1"
GOOD = {"recipe": "demo", "max_steps": 2, "per_device_train_batch_size": 2}
# A real failure of the launched run: the trainer refuses this value (after the launch has already
# moved the finished run aside, as any crash of a retrain would).
BAD = {**GOOD, "extra_args": ["--lora_dropout", "1.5"]}


def _refusal(result: dg.ExecuteInProcessResult, step: str) -> str:
    """The description of the dg.Failure that ``step`` raised (the one-line reason)."""
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == step]
    return failure.step_failure_data.user_failure_data.description


def _current(instance: dg.DagsterInstance, key: str) -> str:
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[VERSION]), limit=1)
    return result.records[0].asset_materialization.tags["dagster/data_version"]


@pytest.mark.slow
def test_a_failed_retrain_leaves_nothing_to_register_and_tags_come_from_the_adapters_record(tmp_path: Path,
                                                                                            monkeypatch):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    from riskva_assets import asset_metadata
    from riskva_assets.definitions import defs
    from riskva_core.launch.resume import LINEAGE_FILE, SUPERSEDED_DIR, adapter_version, lineage_tags, read_lineage
    from riskva_core.paths import DataRoot
    from riskva_core.registry.client import Registry

    home = tmp_path / "home"
    synth(home / "datasets" / VERSION, num_images=24, seed=0, image_size=(128, 96), num_workers=1)
    root = DataRoot(home)
    adapter = root.train_dir(VERSION) / "adapter"
    paths = DataRootResource(root=str(home))
    resources = {"paths": paths, "mlflow": MlflowResource(paths=paths),
                 "launcher": TrainingLauncher(termination_timeout_s=60)}
    code_version = asset_metadata.CODE_VERSIONS["lora_adapter"]

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])

        def run(selection: list[str], train: dict | None = None, **kw) -> dg.ExecuteInProcessResult:
            ops = {"base_model": {"config": {"size": "tiny"}}, "lora_adapter": {"config": train or GOOD},
                   "registered_model": {"config": {"max_new_tokens": 8, "batch_size": 2}}}
            return dg.materialize(VERSION_ASSETS, selection=selection, partition_key=VERSION, instance=instance,
                                  resources=resources, run_config=dg.RunConfig(ops={k: v for k, v in ops.items()
                                                                                    if k in selection}), **kw)

        def refused(asset: str) -> str:
            result = run([asset], raise_on_error=False)
            assert not result.success and not result.asset_materializations_for_node(asset)
            reason = _refusal(result, asset)
            assert "\n" not in reason and reason.startswith(f"{asset} refuses to ")
            return reason

        def stale(key: str) -> list[str]:
            """Why Dagster itself shows ``key`` stale: '<upstream>: <category>: <reason>' per cause."""
            resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
            if resolver.get_status(dg.AssetKey(key), VERSION) != StaleStatus.STALE:
                return []
            return [f"{c.dependency.asset_key.to_user_string() if c.dependency else ''}: {c.category.value}: {c.reason}"
                    for c in resolver.get_stale_causes(dg.AssetKey(key), VERSION)]

        run([*DATA_ASSETS, "base_model"])
        first = run(["lora_adapter"])
        run(["merged_model"])
        # The finished run's own record, written by the launching process once training finished.
        record = read_lineage(adapter)
        assert record["adapter_version"] == adapter_version(adapter)
        assert record["data_versions"] == {k: _current(instance, k) for k in ("raw_metadata", "sft_jsonl",
                                                                              "base_model")}
        assert record["code_versions"] == {"lora_adapter": code_version} and record["seed"] == 0
        assert record["train_config"]["max_steps"] == 2 and record["dagster_run_id"] == first.run_id
        merge_report = json.loads((root.merged_dir(VERSION) / "merge_report.json").read_text())
        assert merge_report["adapter_lineage"] == record

        # 1. The training code changes (as the reloaded code location hashes it) and the retrain fails.
        monkeypatch.setitem(asset_metadata.CODE_VERSIONS, "lora_adapter", "edited-train-code")
        reason = refused("merged_model")  # not retrained yet: the adapter's record says which code made it
        assert f"lora_adapter code version {code_version} vs edited-train-code (recorded vs now)" in reason
        failed = run(["lora_adapter"], BAD, raise_on_error=False)
        assert not failed.success and not failed.asset_materializations_for_node("lora_adapter")
        # The finished run's adapter was moved aside with its record before the launch: nothing of it is
        # left where merge looks, and no record describes the run that failed.
        assert not adapter.exists()
        (moved,) = (root.train_dir(VERSION) / SUPERSEDED_DIR).glob("*/adapter")
        assert json.loads((moved / LINEAGE_FILE).read_text()) == record
        reason = refused("merged_model")
        assert reason.startswith(f"merged_model refuses to merge: no finished adapter at {adapter}: a newer "
                                 f"lora_adapter run moved the last one to {moved} and did not finish (that one was "
                                 f"trained on lora_adapter code version {code_version} vs edited-train-code")
        assert reason.endswith(f"materialize lora_adapter for {VERSION}")
        reason = refused("registered_model")
        assert (f"was merged from an adapter that was trained on lora_adapter code version {code_version} vs "
                f"edited-train-code (recorded vs now): materialize lora_adapter for {VERSION}, then merged_model"
                in reason)
        monkeypatch.setitem(asset_metadata.CODE_VERSIONS, "lora_adapter", code_version)

        # 2. New data (one photo's description corrected), validated and prepared; the retrain fails.
        csv = home / "datasets" / VERSION / "metadata.csv"
        lines = csv.read_text(encoding="utf-8").splitlines()
        csv.write_text("\n".join([lines[0], lines[1] + "（经复核）", *lines[2:]]) + "\n", encoding="utf-8")
        run(list(DATA_ASSETS))
        old, new = record["data_versions"]["sft_jsonl"], _current(instance, "sft_jsonl")
        assert old != new
        # Dagster's own view: lora_adapter is stale because of the prepared data it was trained on.
        new_data = [c for c in stale("lora_adapter") if c.startswith("sft_jsonl: DATA: ")]
        assert new_data, stale("lora_adapter")
        assert not run(["lora_adapter"], BAD, raise_on_error=False).success
        assert [c for c in stale("lora_adapter") if c.startswith("sft_jsonl: DATA: ")] == new_data  # no new run
        assert f"sft_jsonl data version {old} vs {new}" in refused("merged_model")
        reason = refused("registered_model")
        assert f"sft_jsonl data version {old} vs {new} (recorded vs now): materialize lora_adapter" in reason
        assert "code version" not in reason  # only what differs is named
        assert list(Registry.under(root).client().search_model_versions("name='riskva'")) == []

        # 3. The retrain succeeds: merged and registered, tagged from the new adapter's own record.
        retrained = run(["lora_adapter"])
        assert retrained.success and not [c for c in stale("lora_adapter") if c.startswith("sft_jsonl: DATA: ")]
        run(["merged_model"])
        registered = run(["registered_model"])
    record = read_lineage(adapter)
    assert record["data_versions"]["sft_jsonl"] == new and record["dagster_run_id"] == retrained.run_id
    (mat,) = registered.asset_materializations_for_node("registered_model")
    tags = Registry.under(root).get_version(mat.metadata["model_version"].value).tags
    assert {k: tags[k] for k in lineage_tags(record)} == lineage_tags(record)
    assert tags["data_version.sft_jsonl"] == new and tags["code_version.lora_adapter"] == code_version
    assert tags["train.seed"] == "0" and tags["dataset_version"] == VERSION and tags["base_model"] == "demo"
    assert tags["dagster_run_id"] == registered.run_id
    merge_report = json.loads((root.merged_dir(VERSION) / "merge_report.json").read_text())
    assert merge_report["adapter_lineage"] == record
    if "verdict" in merge_report:  # the merge gate's verdict, where this version of the gate gives one
        assert tags["merge.verdict"] == merge_report["verdict"]
