"""The launcher choice of lora_adapter: how it is chosen and what each launcher would run.
(The ray launcher trains for real in test_ray_launcher.py; the k8s pod is rendered and validated in
tests/test_scale_out_configs.py.)"""
from __future__ import annotations

import pydantic
import pytest

from riskva_assets.launchers import deepspeed_json, launcher_command
from riskva_assets.ray_driver import rendezvous
from riskva_assets.resources import TrainingLauncher

ARGS = ["--model_name_or_path", "/m", "--output_dir", "/o"]


def test_the_environment_chooses_the_launcher(monkeypatch):
    from riskva_assets.definitions import build_resources

    monkeypatch.delenv("RISKVA_TRAIN_LAUNCHER", raising=False)
    assert build_resources()["launcher"].process_config_and_initialize().launcher == "local"
    monkeypatch.setenv("RISKVA_TRAIN_LAUNCHER", "ray")
    monkeypatch.setenv("RISKVA_RAY_ADDRESS", "http://10.0.0.1:8265")
    launcher = build_resources()["launcher"].process_config_and_initialize()
    assert (launcher.launcher, launcher.ray_address) == ("ray", "http://10.0.0.1:8265")
    with pytest.raises(pydantic.ValidationError, match="launcher must be one of local, ray, k8s, not 'slurm'"):
        TrainingLauncher(launcher="slurm")


def test_each_launcher_runs_the_same_entry_with_the_same_deepspeed_json():
    local = launcher_command(TrainingLauncher(num_processes=2), ARGS)
    pod = launcher_command(TrainingLauncher(launcher="k8s", num_processes=8), ARGS)
    ray = launcher_command(TrainingLauncher(launcher="ray", num_processes=16, ray_placement="SPREAD"), ARGS)
    assert local[1] == "launch" and local[-len(ARGS) - 2:] == ["-m", "riskva_assets.pipes_train", *ARGS]
    # In the pod: the image's accelerate and the checkout-relative config, not this machine's paths.
    assert pod[:4] == ["accelerate", "launch", "--config_file", "configs/deepspeed_zero2.yaml"]
    assert pod[-len(ARGS) - 2:] == local[-len(ARGS) - 2:]
    assert ray[:3] == ["python", "-m", "riskva_assets.ray_driver"] and ray[-len(ARGS) - 1:] == ["--", *ARGS]
    flags = dict(zip(ray[3:ray.index("--"):2], ray[4:ray.index("--"):2]))
    assert flags == {"--num_ranks": "16", "--deepspeed_config": "configs/ds_zero2.json", "--placement": "SPREAD",
                     "--cpus_per_rank": "1.0", "--gpus_per_rank": "1.0"}
    assert deepspeed_json(TrainingLauncher(accelerate_config="configs/deepspeed_zero3.yaml")) == "configs/ds_zero3.json"


def test_ray_rendezvous_numbers_ranks_node_by_node_and_shares_each_nodes_gpus():
    # Bundles as Ray placed them: two on node A, one on B, one more on A (GPU ids as Ray assigned them).
    nodes = [("10.0.0.1", ["0"]), ("10.0.0.2", ["3"]), ("10.0.0.1", ["1"]), ("10.0.0.1", ["2"])]
    env = rendezvous(nodes)
    assert [e["RANK"] for e in env] == ["0", "3", "1", "2"]  # node A's ranks adjacent, rank 0 on A
    assert [e["LOCAL_RANK"] for e in env] == ["0", "0", "1", "2"]
    assert [e["LOCAL_WORLD_SIZE"] for e in env] == ["3", "1", "3", "3"] and {e["WORLD_SIZE"] for e in env} == {"4"}
    assert env[0]["CUDA_VISIBLE_DEVICES"] == env[2]["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert env[1]["CUDA_VISIBLE_DEVICES"] == "3"
    assert "CUDA_VISIBLE_DEVICES" not in rendezvous([("10.0.0.1", []), ("10.0.0.2", [])])[0]


def test_the_local_launcher_defaults_to_one_rank_per_visible_gpu(monkeypatch):
    """Like the seed's launch line on an 8-GPU host (GPUs simulated); ray/k8s must be told their count."""
    import dagster as dg
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert TrainingLauncher().ranks() == 8 and TrainingLauncher(num_processes=2).ranks() == 2
    cmd = launcher_command(TrainingLauncher(), ARGS)
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainingLauncher().ranks() == 1
    with pytest.raises(dg.Failure, match="num_processes must be set for the ray launcher"):
        TrainingLauncher(launcher="ray").ranks()
