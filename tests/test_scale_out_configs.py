"""The scale-out configs cannot run here (no GPUs, no cluster); they are parsed with the
same loaders the real tools use, so a typo fails here rather than on the cluster."""
import json
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["accelerate_multigpu.yaml", "accelerate_multinode.yaml"])
def test_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(CONFIGS / "scale_out" / name)
    assert cfg.distributed_type.value == "DEEPSPEED"
    ds_file = CONFIGS.parent / cfg.deepspeed_config["deepspeed_config_file"]
    assert ds_file.exists(), ds_file
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert cfg.num_processes % cfg.num_machines == 0


def test_dagster_k8s_instance_matches_dagsters_schema(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    for var in ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB", "RISKVA_IMAGE"):
        monkeypatch.setenv(var, "x")
    (tmp_path / "dagster.yaml").write_text((CONFIGS / "scale_out" / "dagster_k8s_instance.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert "postgres" in config["storage"]


def test_k8s_training_pod_requests_gpus_and_grace_period():
    pod = yaml.safe_load((CONFIGS / "scale_out" / "k8s_training_pod.yaml").read_text())
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 300


def test_mlflow_server_env_names_postgres_and_s3():
    env = dict(
        line.split("=", 1)
        for line in (CONFIGS / "scale_out" / "mlflow_server.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
