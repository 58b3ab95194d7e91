"""lora_adapter's resume decision: continue only from checkpoints of the same run identity; move the
others aside; never resume a finished run."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from model_fixtures import make_hf_cache_snapshot, make_prepared_dataset, make_tiny_model

from riskva_core.launch.resume import (COMPLETE_FILE, IDENTITY_FILE, LINEAGE_FILE, SUPERSEDED_DIR, config_files_digest,
                                  finished_run_record, launcher_config_files, mark_complete, plan_resume,
                                  run_identity, with_resume, write_lineage)

ARGS = ["--model_name_or_path", "/m", "--dataset_path", "/d", "--output_dir", "/o", "--max_steps", "4"]
DATA = {"sft_jsonl": "aaaa", "base_model": "bbbb"}
HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


def _checkpoint(out: Path, step: int) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def _superseded(out: Path) -> list[str]:
    return sorted(p.relative_to(out / SUPERSEDED_DIR).parts[1] for p in (out / SUPERSEDED_DIR).glob("*/*"))


def test_same_identity_resumes_and_anything_else_is_moved_aside(tmp_path: Path):
    out = tmp_path / "train"
    identity = run_identity(ARGS, DATA, "/m", code_version="c1")
    plan = plan_resume(out, identity)
    assert (plan.action, plan.why) == ("fresh", "no checkpoint yet; starting fresh")
    assert json.loads((out / IDENTITY_FILE).read_text()) == identity
    _checkpoint(out, 2)  # a cancelled or crashed attempt left a checkpoint
    # Retry / re-execution with the same data, base model and config; flags that cannot change the result
    # (where and how often it logs or saves, loader workers, the resume flag itself) keep the checkpoints.
    same = run_identity(ARGS[:-4] + ["--output_dir", "/elsewhere", "--max_steps", "4", "--logging_steps", "1",
                                     "--report_to", "tensorboard", "--save_steps=7", "--logging_first_step",
                                     "--dataloader_num_workers", "4", "--resume_from_checkpoint", "auto"],
                        DATA, "/m", code_version="c1")
    assert same == identity
    plan = plan_resume(out, same)
    assert plan.resume and "resuming" in plan.why and (out / "checkpoint-2").is_dir()
    assert with_resume(ARGS, True)[-2:] == ["--resume_from_checkpoint", "auto"]
    assert "--resume_from_checkpoint" not in with_resume(ARGS + ["--resume_from_checkpoint", "/x"], False)
    # Other data: the checkpoints are moved aside (with the identity they belong to), never resumed from.
    plan = plan_resume(out, run_identity(ARGS, {**DATA, "sft_jsonl": "cccc"}, "/m", code_version="c1"))
    assert plan.action == "fresh" and plan.why.startswith("checkpoints of other data_versions: moved them to ")
    assert not list(out.glob("checkpoint-*")) and plan.superseded.parent == out / SUPERSEDED_DIR
    assert sorted(p.name for p in plan.superseded.iterdir()) == ["checkpoint-2", IDENTITY_FILE]
    assert json.loads((plan.superseded / IDENTITY_FILE).read_text()) == identity
    # Each of: training code, launcher/DeepSpeed config, base model, rank count, a flag that matters.
    changes = {"code_version": dict(code_version="c2"), "launcher_config_sha256": dict(launcher_config_sha256="x"),
               "base_model": dict(base_model="/other"), "world_size": dict(world_size=2),
               "train_config_sha256": dict(train_args=ARGS[:-1] + ["8"])}
    for key, change in changes.items():
        assert plan_resume(out, identity).why == "no checkpoint yet; starting fresh"
        _checkpoint(out, 1)  # written by the run of `identity`
        kwargs = {"train_args": ARGS, "data_versions": DATA, "base_model": "/m", "code_version": "c1", **change}
        plan = plan_resume(out, run_identity(**kwargs))
        assert plan.action == "fresh" and f"checkpoints of other {key}: moved" in plan.why, (key, plan.why)
    assert _superseded(out).count("checkpoint-1") == len(changes)
    # Checkpoints with no recorded identity (written by hand or an older version): not trusted.
    (out / IDENTITY_FILE).unlink()
    _checkpoint(out, 3)
    plan = plan_resume(out, identity)
    assert plan.why.startswith("checkpoints without a run identity: moved them to ")
    assert "checkpoint-3" in _superseded(out)


def test_a_finished_run_is_reused_as_it_is_or_retrained_never_resumed(tmp_path: Path):
    out = tmp_path / "train"
    identity = run_identity(ARGS, DATA, "/m", code_version="c1")
    plan_resume(out, identity)
    _checkpoint(out, 4)  # the finished run keeps checkpoint-{max_steps}

    def finish() -> str:  # what lora_adapter does when the run has finished: the record, then completion
        (out / "adapter").mkdir(exist_ok=True)
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        record = finished_run_record(identity, out / "adapter", data_versions=DATA,
                                     code_versions={"lora_adapter": "c1"}, base_model={"name": "/m"}, step=4)
        write_lineage(out / "adapter", record)
        mark_complete(out, identity, record["adapter_version"], 4)
        return record["adapter_version"]

    version = finish()
    plan = plan_resume(out, identity, version)
    assert plan.action == "reuse" and plan.completed["step"] == 4 and "nothing trained" in plan.why
    # Its adapter was replaced or removed since: the finished run's checkpoint-4 is not resumed into 0 steps.
    plan = plan_resume(out, identity, None)
    assert plan.action == "fresh" and plan.why.startswith("the finished run of this identity no longer has its adapter")
    assert not (out / COMPLETE_FILE).exists() and not list(out.glob("checkpoint-*")) and not (out / "adapter").exists()
    assert sorted(p.name for p in plan.superseded.iterdir()) == ["adapter", "checkpoint-4", COMPLETE_FILE,
                                                                 IDENTITY_FILE]
    # An adapter without its lineage record (written before records were kept) is not reused either.
    _checkpoint(out, 4)
    version = finish()
    (out / "adapter" / LINEAGE_FILE).unlink()
    assert plan_resume(out, identity, version).action == "fresh"
    # A code change after a finished run: step 0, the finished run's checkpoints moved aside.
    _checkpoint(out, 4)
    version = finish()
    plan = plan_resume(out, run_identity(ARGS, DATA, "/m", code_version="c2"), version)
    assert plan.action == "fresh" and plan.why.startswith("checkpoints of other code_version: moved them")


def test_launcher_config_files_follow_the_accelerate_config_and_the_deepspeed_flag(tmp_path: Path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "ds3.json").write_text('{"zero_optimization": {"stage": 3}}')
    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n")
    files = launcher_config_files(acc, ARGS + ["--deepspeed", "ds3.json"], tmp_path)
    assert files == [acc, tmp_path / "ds.json", tmp_path / "ds3.json"]
    before = config_files_digest(files)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    assert config_files_digest(files) != before


@pytest.mark.slow
def test_preemption_resumes_a_finished_run_is_reused_and_a_code_change_retrains_from_step_0(tmp_path, monkeypatch):
    """Through Dagster, on the tiny model placed in a temporary Hugging Face cache under a hub id:
    the base is pinned to its snapshot commit; a SIGTERM to the launcher that Dagster did not send
    (a spot reclaim) is retried and resumed; a re-run of the finished run trains nothing; a change
    to the training code trains again from step 0 with the finished run's checkpoints moved aside."""
    from riskva_assets import asset_metadata
    from riskva_assets.assets import VERSION_ASSETS
    from riskva_assets.model_assets import PIN_LINEAGE, base_model_tags
    from riskva_assets.partitions import DATASET_VERSION
    from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher
    from riskva_core.paths import DataRoot
    from rank_callbacks import PAUSE_ENV, rank_env

    home, version = tmp_path / "home", "v1"
    root = DataRoot(home)
    jsonl = make_prepared_dataset(root.prepared_dir(version, "jsonl"), n=8)
    tiny = make_tiny_model(tmp_path / "tiny", jsonl)
    make_hf_cache_snapshot(tmp_path / "hub", HUB_ID, "c0ffee1", tiny, monkeypatch)
    paths = DataRootResource(root=str(home))
    resources = {"paths": paths, "mlflow": MlflowResource(paths=paths),
                 "launcher": TrainingLauncher(base_model_path=HUB_ID, termination_timeout_s=60)}
    train = {"config": {"recipe": "demo", "max_steps": 3, "per_device_train_batch_size": 1,
                        "extra_args": ["--logging_steps", "1"]}}
    out = root.train_dir(version)

    def materialize(selection: str, instance) -> dg.ExecuteInProcessResult:
        return dg.materialize(VERSION_ASSETS, selection=[selection], partition_key=version, instance=instance,
                              run_config=dg.RunConfig(ops={selection: train} if selection == "lora_adapter" else {}),
                              resources=resources)

    finished = threading.Event()

    def preempt() -> None:  # the cloud, not Dagster: SIGTERM to the launcher once rank 0 is past step 1
        marker = out / "debug" / "paused-rank0"
        while not marker.is_file() and not finished.is_set():  # the rank idles at the marker until signalled
            time.sleep(0.2)
        if marker.is_file():
            launcher = psutil.Process(int(marker.read_text().split()[1])).parent()
            assert "accelerate" in " ".join(launcher.cmdline())
            os.kill(launcher.pid, signal.SIGTERM)

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [version])
        (base,) = materialize("base_model", instance).asset_materializations_for_node("base_model")
        assert base.metadata["revision"].value == "c0ffee1" and base.metadata["pinned"].value == f"{HUB_ID}@c0ffee1"
        # The hub's refs/main moves on after the pin: training still loads the pinned commit.
        make_hf_cache_snapshot(tmp_path / "hub", HUB_ID, "beef002", tiny)

        for name, value in rank_env(pause_after_step=1).items():  # a test callback in the ranks (tests/rank_site)
            monkeypatch.setenv(name, value)
        signaller = threading.Thread(target=preempt, daemon=True)
        signaller.start()
        try:
            first = materialize("lora_adapter", instance)
        finally:
            finished.set()
            signaller.join(timeout=5)
        kinds = [e.event_type_value for e in first.all_events]
        assert first.success and "STEP_UP_FOR_RETRY" in kinds and "STEP_RESTARTED" in kinds
        (mat,) = first.asset_materializations_for_node("lora_adapter")
        meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        assert meta["resumed"] and meta["resumed_from_step"] == 1 and meta["step"] == 3
        assert meta["preemption_retries_used"] == 1
        adapter = out / "adapter"
        pin = json.loads((adapter / PIN_LINEAGE).read_text())
        assert pin["revision"] == "c0ffee1" and pin["local_path"].endswith("snapshots/c0ffee1")
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
        assert base_model_tags(adapter) == {"base_model.identity": f"{HUB_ID}@c0ffee1",
                                            "base_model.revision": "c0ffee1"}
        monkeypatch.delenv(PAUSE_ENV)

        # The same partition again, nothing changed: the finished run is reused, not "resumed" into 0 steps.
        (again,) = materialize("lora_adapter", instance).asset_materializations_for_node("lora_adapter")
        assert again.metadata["reused_finished_run"].value and again.metadata["trained_steps"].value == 0
        assert again.tags["dagster/data_version"] == mat.tags["dagster/data_version"]

        # A change to riskva_core/train (as the reloaded code location hashes it): training again from step 0.
        monkeypatch.setitem(asset_metadata.CODE_VERSIONS, "lora_adapter", "edited-train-code")
        (retrained,) = materialize("lora_adapter", instance).asset_materializations_for_node("lora_adapter")
    meta = {k: getattr(v, "value", v) for k, v in retrained.metadata.items()}
    assert not meta["resumed"] and meta["resumed_from_step"] == 0 and meta["step"] == 3
    history = json.loads((out / "adapter" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]  # every step trained in this run
    moved = Path(meta["superseded_checkpoints"])
    assert (moved / "checkpoint-3").is_dir() and json.loads((moved / "run_identity.json").read_text())["code_version"] \
        != "edited-train-code"
