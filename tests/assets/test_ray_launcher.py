"""The ``ray`` launcher on a real two-node Ray cluster: one node per network namespace (tests/ray_netns.py).

The Dagster side runs inside the worker's namespace and reaches the head only over the veth pair;
before any job, every address the cluster advertises is checked to be a namespace address, so no
packet goes to the host's own address. ``lora_adapter`` then trains from 2 ranks on the 2 nodes under
DeepSpeed ZeRO-2 on gloo, each rank a worker of Ray Train's ``TorchTrainer`` (riskva_assets/ray_train.py): a cancel mid-run leaves a checkpoint from each rank, the re-execution
resumes from it, logs and metrics are in the Dagster run, and the adapter equals the local 2-rank
run's with the same seed.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from conftest import missing_requirement
from model_fixtures import make_prepared_dataset, make_tiny_model
from ray_netns import HEAD_IP, SUBNET, TRAIN_CONFIG, VERSION, WORKER_IP, NetnsError, NetnsRayCluster
from test_cancel import _wait  # the same polling helper

from riskva_core.paths import DataRoot

SCRIPT = str(Path(__file__).resolve().parents[1] / "ray_netns.py")


@pytest.fixture(scope="module")
def cluster():
    """Two namespaces, a Ray head in one and a worker in the other; torn down whatever happens."""
    c = NetnsRayCluster()
    try:
        try:
            c.create()
        except NetnsError as exc:
            missing_requirement(f"cannot create network namespaces for the two Ray nodes: {exc}")
        c.start_ray()
        yield c
    finally:
        c.close()


def _adapter(home: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(DataRoot(home).train_dir(VERSION) / "adapter" / "adapter_model.safetensors"))


def _materialize_local(home: Path) -> dg.MaterializeResult:
    from riskva_assets.assets import VERSION_ASSETS
    from riskva_assets.partitions import DATASET_VERSION
    from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher

    paths = DataRootResource(root=str(home))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        result = dg.materialize(VERSION_ASSETS, selection=["lora_adapter"], partition_key=VERSION, instance=instance,
                                run_config=dg.RunConfig(ops={"lora_adapter": {"config": TRAIN_CONFIG}}),
                                resources={"paths": paths, "mlflow": MlflowResource(paths=paths),
                                           "launcher": TrainingLauncher(num_processes=2)})
    (mat,) = result.asset_materializations_for_node("lora_adapter")
    return mat


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three trainings (local, cancelled, resumed) and a Ray cluster on 2 cores
def test_ray_launcher_trains_on_two_namespace_nodes_cancels_resumes_and_matches_local(cluster, tmp_path):
    # Before any job: the cluster's every address (nodes and GCS) is one of the namespaces'.
    nodes = cluster.wait_nodes(2)
    advertised = {n["NodeManagerAddress"] for n in nodes} | {n["GcsAddress"].rsplit(":", 1)[0] for n in nodes}
    assert len(nodes) == 2 and advertised == {HEAD_IP, WORKER_IP}, nodes
    assert all(ipaddress.ip_address(a) in SUBNET for a in advertised)

    local_home, ray_home, dagster_home = tmp_path / "local", tmp_path / "ray", tmp_path / "dagster_home"
    jsonl = make_prepared_dataset(DataRoot(local_home).prepared_dir(VERSION, "jsonl"), n=8)
    make_tiny_model(DataRoot(local_home).base_model_dir(VERSION), jsonl)
    shutil.copytree(local_home, ray_home)
    dagster_home.mkdir()
    reference = _materialize_local(local_home)
    assert reference.metadata["launcher"].value == "local"

    def dagster_side(*extra: str) -> subprocess.Popen:
        """dg.materialize of lora_adapter with the ray launcher, run inside the worker's namespace."""
        return cluster.popen_in(cluster.worker_ns, [sys.executable, SCRIPT, "materialize", str(ray_home),
                                                    cluster.address, *extra],
                                env={"DAGSTER_HOME": str(dagster_home)}, log=tmp_path / f"dagster{len(extra)}.log")

    def log(n: int) -> str:
        return (tmp_path / f"dagster{n}.log").read_text()[-5000:]

    # 1. Paused after step 1 on both ranks, then cancelled (SIGINT: Dagster's in-process interrupt).
    out = DataRoot(ray_home).train_dir(VERSION)
    first = dagster_side("--pause")
    markers = [out / "debug" / f"paused-rank{r}" for r in (0, 1)]
    try:
        _wait(lambda: all(m.is_file() for m in markers) or first.poll() is not None, 900,
              "both ranks to reach step 1", lambda: ":\n" + log(1))
        assert first.poll() is None, "the run ended before it could be cancelled:\n" + log(1)
        placement = json.loads((out / "ray_placement.json").read_text())
        assert sorted(placement.values()) == [HEAD_IP, WORKER_IP]  # 2 ranks, 2 different nodes
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    checkpoint = out / "checkpoint-1"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1, log(1)
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(list(checkpoint.rglob("*optim_states.pt"))) == 2  # each rank's ZeRO-2 shard

    # 2. Re-execution: resumes from that checkpoint and finishes.
    second = dagster_side()
    assert second.wait(timeout=600) == 0, log(0)
    run_id = next(x for x in log(0).splitlines() if x.startswith("RUN_ID=")).split("=", 1)[1]
    os.environ["DAGSTER_HOME"], saved = str(dagster_home), os.environ.get("DAGSTER_HOME")
    try:
        with dg.DagsterInstance.get() as instance:
            (event,) = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
            mat = event.event_log_entry.asset_materialization
            messages = [e.user_message for e in instance.all_logs(run_id)]
    finally:
        os.environ.pop("DAGSTER_HOME") if saved is None else os.environ.__setitem__("DAGSTER_HOME", saved)
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    assert meta["launcher"] == "ray" and meta["resumed"] is True and meta["step"] == 3, meta
    assert meta["reported_by_rank"] == 0 and "train_loss" in meta and meta["Ray Job ID"].startswith("pipes-")
    # Rank 0's Trainer logs reached the run through Pipes over the Ray job log.
    assert any("training: world size 2" in m for m in messages), messages[-20:]
    assert any(m.startswith("step ") and "loss=" in m for m in messages), messages[-20:]

    # 3. Same seed, same data, same DeepSpeed JSON: the same adapter as the local 2-rank run.
    ref, got = _adapter(local_home), _adapter(ray_home)
    assert ref.keys() == got.keys()
    worst = max(float((ref[k].float() - got[k].float()).abs().max()) for k in ref)
    assert worst <= 1e-4, f"ray adapter differs from local by {worst}"
    assert any(float(t.abs().max()) > 0 for k, t in got.items() if "lora_B" in k)  # it trained
