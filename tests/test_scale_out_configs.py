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
    # Unset (-1): the single-node launch line gives the count, one rank per visible GPU.
    assert cfg.num_processes == -1 or cfg.num_processes % cfg.num_machines == 0


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "scale_out/accelerate_multigpu.yaml"])
def test_single_node_configs_take_the_rank_count_from_the_launch_line(name):
    """No number in the config: accelerate has no "every GPU" value there, and a number would quietly use
    that many of the host's GPUs. accelerate's own validation then asks for --num_processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert "num_processes" not in yaml.safe_load((CONFIGS / name).read_text())
    parser = launch_command_parser()
    bare = parser.parse_args(["--config_file", str(CONFIGS / name), "-m", "riskva_core.train"])
    with pytest.raises(ValueError, match="manually pass in `--num_processes`"):
        _validate_launch_command(bare)
    given = parser.parse_args(["--config_file", str(CONFIGS / name), "--num_processes", "8", "-m", "riskva_core.train"])
    args, _, _ = _validate_launch_command(given)
    assert args.num_processes == 8 and args.use_deepspeed


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
