"""The launcher choice of lora_adapter: how it is chosen and what each launcher would run.
(The ray launcher trains for real in test_ray_launcher.py; the k8s pod is rendered, validated and
submitted to a mocked Kubernetes API in tests/test_scale_out_configs.py.)"""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import pydantic
import pytest

from riskva_assets.resources import TrainingLauncher
from riskva_core.errors import RiskvaError
from riskva_core.launch.commands import deepspeed_json, launcher_command

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
    local = TrainingLauncher(num_processes=2).command(ARGS)
    pod = TrainingLauncher(launcher="k8s", num_processes=8).command(ARGS)
    ray = TrainingLauncher(launcher="ray", num_processes=16, ray_placement="SPREAD").command(ARGS)
    assert local[1] == "launch" and local[-len(ARGS) - 2:] == ["-m", "riskva_assets.pipes_rank", *ARGS]
    # In the pod: the image's accelerate and the checkout-relative config, not this machine's paths.
    assert pod[:4] == ["accelerate", "launch", "--config_file", "configs/deepspeed_zero2.yaml"]
    assert pod[-len(ARGS) - 2:] == local[-len(ARGS) - 2:]
    assert ray[:3] == ["python", "-m", "riskva_assets.ray_train"] and ray[-len(ARGS) - 1:] == ["--", *ARGS]
    flags = dict(zip(ray[3:ray.index("--"):2], ray[4:ray.index("--"):2]))
    assert flags == {"--num_ranks": "16", "--deepspeed_config": "configs/ds_zero2.json", "--placement": "SPREAD",
                     "--cpus_per_rank": "1.0", "--gpus_per_rank": "1", "--max_failures": "0",
                     "--rank_module": "riskva_assets.pipes_rank"}
    zero3 = TrainingLauncher(accelerate_config="configs/deepspeed_zero3.yaml", num_processes=1).spec()
    assert deepspeed_json(zero3) == "configs/ds_zero3.json"


def test_ray_train_scaling_maps_one_gpu_per_rank_and_refuses_shares_and_multiples():
    """Ray Train's ScalingConfig as the ray job builds it: N workers, CPUs per rank, 1 GPU per rank (use_gpu),
    the placement strategy; a fraction or several GPUs per rank is refused (one line, before any job)."""
    from riskva_assets.ray_train import run_config, scaling_config

    gpu = scaling_config(16, 4.0, 1, "SPREAD")
    assert (gpu.num_workers, gpu.use_gpu, gpu.placement_strategy) == (16, True, "SPREAD")
    assert gpu.resources_per_worker == {"CPU": 4.0, "GPU": 1} and gpu.num_gpus_per_worker == 1
    cpu = scaling_config(2, 1.0, 0, "STRICT_SPREAD")
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.0} and cpu.num_gpus_per_worker == 0
    for share in (0.5, 2, 1.5):
        with pytest.raises(RiskvaError, match=f"ray_gpus_per_rank {share:g}: a rank trains on 0 .CPU. or 1 GPU"):
            scaling_config(4, 1.0, share, "PACK")
        launcher = TrainingLauncher(launcher="ray", num_processes=4, ray_gpus_per_rank=share)
        with pytest.raises(dg.Failure, match="raise num_processes"):
            launcher.command(ARGS)
    rc = run_config(Path("/data/o/ray_train"), "pipes-abc", 2)
    assert (rc.storage_path, rc.name, rc.failure_config.max_failures) == ("/data/o/ray_train", "pipes-abc", 2)


def test_the_local_launcher_defaults_to_one_rank_per_visible_gpu(monkeypatch):
    """Like the seed's launch line on an 8-GPU host (GPUs simulated); ray/k8s must be told their count."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert TrainingLauncher().ranks() == 8 and TrainingLauncher(num_processes=2).ranks() == 2
    cmd = launcher_command(TrainingLauncher().spec(), ARGS)
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainingLauncher().ranks() == 1
    with pytest.raises(dg.Failure, match="num_processes must be set for the ray launcher"):
        TrainingLauncher(launcher="ray").ranks()


def test_local_ranks_find_this_venvs_tools_first_and_pods_keep_their_images_path(monkeypatch):
    """DeepSpeed JIT-builds its CPU shm op with the first ``ninja`` on PATH; a system ninja for some
    launches and the venv's for others rebuilt it on every switch. Local ranks get this interpreter's
    folder first, once; a pod or a Ray node keeps its own PATH."""
    import os
    import sys

    from riskva_core.launch.commands import rank_env, venv_first_path

    here = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", here, "/bin"]))
    assert venv_first_path() == os.pathsep.join([here, "/usr/bin", "/bin"])
    assert venv_first_path("/opt/x::/usr/bin") == os.pathsep.join([here, "/opt/x", "/usr/bin"])
    assert rank_env(TrainingLauncher().spec())["PATH"] == venv_first_path()
    for other in ("ray", "k8s"):
        assert "PATH" not in rank_env(TrainingLauncher(launcher=other, num_processes=2).spec())
