"""Cancelling a training run the way the UI does: launched and terminated through Dagster's GraphQL
API on a real instance (DefaultRunLauncher → gRPC code server → run worker → Pipes → accelerate/
torchrun with two CPU ranks). Every rank saves a checkpoint, the run ends CANCELED, and nothing of the
training process group survives. A re-execution then resumes from that checkpoint."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster_graphql.client.client_queries import TERMINATE_RUN_JOB_MUTATION
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql, materialize_assets
from model_fixtures import make_prepared_dataset, make_tiny_model
from rank_callbacks import PAUSE_ENV, rank_env

from riskva_assets.partitions import DATASET_VERSION
from riskva_core.paths import DataRoot

REPO = Path(__file__).resolve().parents[2]
VERSION = "v1"


def _wait(predicate, timeout: float, what: str, explain=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{explain()}")
        time.sleep(0.5)


def _survivors(tree: list, groups: set[int]) -> list[int]:
    """Live processes of the training tree, or of any process group it used."""
    live = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc in tree or os.getpgid(proc.pid) in groups:
                live.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return live


def _kill_our_processes() -> None:
    """On failure: a paused run would idle forever (and keep the code server from shutting down); kill
    everything this test process started: code server, run worker, launcher, ranks."""
    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def _run_story(instance: dg.DagsterInstance, run_id: str) -> str:
    run = instance.get_run_by_id(run_id)
    events = instance.all_logs(run_id)[-15:]
    return f"; run {run.status.value}:\n" + "\n".join(
        f"  {e.dagster_event_type.value if e.dagster_event_type else 'log'}: {(e.message or '')[:300]}" for e in events)


@pytest.mark.slow
def test_cancel_from_dagster_checkpoints_every_rank_and_leaves_no_process(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    root = DataRoot(home)
    jsonl = make_prepared_dataset(root.prepared_dir(VERSION, "jsonl"), n=8)
    make_tiny_model(root.base_model_dir(VERSION), jsonl)
    # The code server, run worker and ranks inherit these: the data root, two ranks, and a pause after step 1
    # (a test callback in every rank, tests/rank_site: it idles there until signalled, so the cancel lands
    # mid-run deterministically).
    monkeypatch.setenv("RISKVA_HOME", str(home))
    monkeypatch.setenv("RISKVA_NUM_PROCESSES", "2")
    for name, value in rank_env(pause_after_step=1).items():
        monkeypatch.setenv(name, value)
    out = root.train_dir(VERSION)
    run_config = {
        "execution": {"config": {"in_process": {}}},
        "ops": {"lora_adapter": {"config": {"recipe": "demo", "max_steps": 3, "per_device_train_batch_size": 1,
                                            "extra_args": ["--save_strategy", "no"]}}},
    }
    # The UI's path without a daemon: submit launches at once (the default queued coordinator needs the daemon).
    coordinator = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    with dg.instance_for_test(overrides={"run_coordinator": coordinator}) as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        with define_out_of_process_context(str(REPO / "workspace.yaml"), None, instance) as context:
            try:
                (launched,) = materialize_assets(context, [dg.AssetKey("lora_adapter")], [VERSION], run_config,
                                                 location_name="riskva")
                data = launched.data["launchPipelineExecution"]
                assert data["__typename"] == "LaunchRunSuccess", data
                run_id = data["run"]["runId"]
                markers = [out / "debug" / f"paused-rank{r}" for r in (0, 1)]
                _wait(lambda: all(m.is_file() for m in markers) or instance.get_run_by_id(run_id).is_finished,
                      420, "both ranks to reach step 1", lambda: _run_story(instance, run_id))
                assert not instance.get_run_by_id(run_id).is_finished, "the run ended before it could be cancelled"
                rank_pids = [int(m.read_text().split()[1]) for m in markers]
                # The whole training tree: accelerate/torchrun agent, both ranks, anything they started.
                agent = psutil.Process(rank_pids[0]).parent()
                assert agent.pid == psutil.Process(rank_pids[1]).parent().pid and agent.pid != os.getpid()
                tree = [agent, *agent.children(recursive=True)]
                groups = {os.getpgid(p.pid) for p in tree}

                terminated = execute_dagster_graphql(context, TERMINATE_RUN_JOB_MUTATION, {"runId": run_id})
                assert terminated.data["terminateRun"]["__typename"] == "TerminateRunSuccess", terminated.data
                _wait(lambda: instance.get_run_by_id(run_id).is_finished, 300, "the run to finish",
                      lambda: _run_story(instance, run_id))
                assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELED
                _wait(lambda: not _survivors(tree, groups), 60, "the training processes to be gone",
                      lambda: f": {_survivors(tree, groups)}")

            except BaseException:  # the workspace's shutdown would otherwise mask the cause
                import traceback

                traceback.print_exc()
                _kill_our_processes()
                raise

    checkpoint = out / "checkpoint-1"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    # Every rank wrote its own part: its RNG state and its ZeRO optimizer shard.
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(list(checkpoint.rglob("*optim_states.pt"))) == 2
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in rank_pids)

    # Re-executing lora_adapter (same data, base model, config) resumes from that checkpoint.
    from riskva_assets.assets import VERSION_ASSETS
    from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher

    monkeypatch.delenv(PAUSE_ENV)
    paths = DataRootResource(root=str(home))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        result = dg.materialize(VERSION_ASSETS, selection=["lora_adapter"], partition_key=VERSION, instance=instance,
                                run_config=dg.RunConfig(ops={"lora_adapter": run_config["ops"]["lora_adapter"]}),
                                resources={"paths": paths, "mlflow": MlflowResource(paths=paths),
                                           "launcher": TrainingLauncher(num_processes=2)})
    (mat,) = result.asset_materializations_for_node("lora_adapter")
    assert mat.metadata["resumed"].value and mat.metadata["step"].value == 3
