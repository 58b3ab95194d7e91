"""The Dagster code location loads and has the shape the product promises."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from riskva_assets.definitions import defs

CHAIN = ["raw_metadata", "sft_jsonl", "sft_parquet", "base_model", "lora_adapter", "merged_model",
         "registered_model", "evaluation_report", "champion_promotion"]
# The loop from the field (issue 28): daily partitions, then the unpartitioned reviewed_dataset.
FEEDBACK = ["inference_log", "production_drift", "review_queue", "labelstudio_tasks", "reviewed_dataset"]


def test_definitions_validate_in_process():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == sorted(CHAIN + FEEDBACK)


def test_every_asset_is_partitioned_described_and_versioned():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if key.to_user_string() in FEEDBACK:
            assert node.group_name == "feedback", key
            daily = isinstance(node.partitions_def, dg.TimeWindowPartitionsDefinition)
            assert daily == (key.to_user_string() != "reviewed_dataset"), key
        else:
            assert node.partitions_def is not None and node.partitions_def.name == "dataset_version", key
            assert node.group_name in {"data", "model", "registry"}, key
        assert node.description, key
        assert node.code_version, key
        assert node.kinds, key


def test_training_is_pooled_and_nothing_is_inertly_automated_and_checks_block():
    graph = defs.resolve_asset_graph()
    # Every asset that puts a model on the accelerator shares the pool (promotion loads two).
    for key in ("lora_adapter", "merged_model", "registered_model", "evaluation_report", "champion_promotion"):
        assert defs.get_assets_def(key).op.pool == "gpu", key
    # No asset declares an automation condition that no sensor would evaluate: the datasets sensor
    # and the schedule are the triggers.
    assert all(graph.get(k).automation_condition is None for k in graph.get_all_asset_keys())
    checks = {(s.asset_key.to_user_string(), s.name): s.blocking
              for k in graph.get_all_asset_keys() for s in defs.get_assets_def(k).check_specs}
    assert checks == {("raw_metadata", "schema_valid"): True, ("merged_model", "merge_equivalent"): True,
                      ("sft_jsonl", "no_near_duplicate_leak"): True, ("sft_parquet", "no_near_duplicate_leak"): True,
                      ("evaluation_report", "meets_thresholds"): False,
                      ("production_drift", "no_drift"): False, ("production_drift", "parse_rate_held"): True}
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("sft_jsonl")).parent_keys} == {"raw_metadata"}
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("lora_adapter")).parent_keys} == {"base_model", "sft_jsonl"}


def test_code_versions_follow_the_core_source_each_asset_runs(tmp_path: Path):
    import shutil

    from riskva_assets.asset_metadata import ASSET_SOURCES, CODE_VERSIONS, REPO_ROOT, source_version

    graph = defs.resolve_asset_graph()
    assert {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()} == CODE_VERSIONS
    assert len({CODE_VERSIONS[k] for k in ("raw_metadata", "lora_adapter", "merged_model", "evaluation_report")}) == 4
    # Editing the training code changes lora_adapter's code version and nothing upstream of it.
    copy = tmp_path / "repo"
    for item in {i for src in ASSET_SOURCES.values() for i in src}:
        target = copy / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO_ROOT / item).is_dir():
            shutil.copytree(REPO_ROOT / item, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(REPO_ROOT / item, target)
    before = {k: source_version(src, copy) for k, src in ASSET_SOURCES.items()}
    assert before == CODE_VERSIONS
    sft = copy / "riskva_core/train/sft.py"
    text = sft.read_text(encoding="utf-8")
    # A comment and a docstring edit (a `git pull` that only touched them) keep every code version, so a
    # preemption retry resumes; a change to the code itself changes lora_adapter's and nothing upstream.
    docstring = text.index('"""') + 3
    sft.write_text(text[:docstring] + "Reworded. " + text[docstring:] + "\n# a note on the training loop\n",
                   encoding="utf-8")
    assert {k: source_version(src, copy) for k, src in ASSET_SOURCES.items()} == before
    sft.write_text(text + "\nSTEP_SCALE = 2\n", encoding="utf-8")
    after = {k: source_version(src, copy) for k, src in ASSET_SOURCES.items()}
    assert {k for k in after if after[k] != before[k]} == {"lora_adapter"}


def test_code_versions_come_from_the_imports_each_asset_reaches(tmp_path: Path):
    """A module newly imported by validation code joins raw_metadata's sources by itself (no list to keep)."""
    import shutil

    from riskva_assets.asset_metadata import ASSET_SOURCES, REPO_ROOT, asset_sources, source_version

    assert "riskva_core/data/validate.py" in ASSET_SOURCES["raw_metadata"]
    assert "riskva_core/train/sft.py" in ASSET_SOURCES["lora_adapter"]
    assert not any(f.startswith("riskva_core/train/") for f in ASSET_SOURCES["raw_metadata"])
    copy = tmp_path / "repo"
    for folder in ("riskva_core", "riskva_assets", "configs"):
        shutil.copytree(REPO_ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "riskva_core/data/extra_rule.py").write_text("RULE = 1\n", encoding="utf-8")
    validate = copy / "riskva_core/data/validate.py"
    validate.write_text(validate.read_text(encoding="utf-8") + "\n\ndef _rule():\n"
                        "    from riskva_core.data.extra_rule import RULE\n    return RULE\n", encoding="utf-8")
    sources = asset_sources(copy)
    assert "riskva_core/data/extra_rule.py" in sources["raw_metadata"]
    assert "riskva_core/data/extra_rule.py" not in sources["lora_adapter"]
    before = {k: source_version(v, copy) for k, v in sources.items()}
    (copy / "riskva_core/data/extra_rule.py").write_text("RULE = 2\n", encoding="utf-8")
    after = {k: source_version(v, copy) for k, v in sources.items()}
    assert before["raw_metadata"] != after["raw_metadata"] and before["lora_adapter"] == after["lora_adapter"]


def test_jobs_sensor_schedule_present():
    assert {j.name for j in defs.jobs} >= {"data_job", "retrain_job", "promote_job", "field_job", "review_job"}
    assert defs.get_sensor_def("new_dataset_sensor") is not None
    assert defs.get_sensor_def("review_progress_sensor") is not None
    # The retrain chain is one dataset version's: the daily feedback assets are not in it.
    assert {k.to_user_string() for k in defs.resolve_job_def("retrain_job").asset_layer.selected_asset_keys} == set(CHAIN)
    assert defs.get_schedule_def("weekly_retrain").cron_schedule == "0 3 * * 1"


def test_dagster_cli_validates_the_code_location_and_instance(tmp_path: Path):
    env = {**os.environ, "RISKVA_HOME": str(tmp_path / "home")}
    home = subprocess.run([sys.executable, "-m", "riskva_assets.instance"], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert Path(home) == tmp_path / "home" / "dagster_home" and (Path(home) / "dagster.yaml").is_file()
    dagster = Path(sys.executable).with_name("dagster")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([str(dagster), "definitions", "validate", "-w", str(root / "workspace.yaml")],
                          env={**env, "DAGSTER_HOME": home}, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "riskva" in proc.stdout + proc.stderr
    # The UI's first visit shows the product (no newsletter dialog over it); nothing calls Dagster's servers.
    import dagster as dg

    with dg.DagsterInstance.from_config(home) as instance:
        assert not instance.nux_enabled and not instance.telemetry_enabled
