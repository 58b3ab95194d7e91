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


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "scale_out/accelerate_multigpu.yaml"])
def test_single_node_configs_start_one_rank_per_gpu_of_the_8_gpu_host(name):
    """The seed's launch line has no --num_processes: through accelerate's own validation the config gives
    8 ranks (an 8-GPU host), and an explicit --num_processes wins (config.check_rank_count guards the rest)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    bare = parser.parse_args(["--config_file", str(CONFIGS / name), "-m", "riskva_core.train"])
    args, _, _ = _validate_launch_command(bare)
    assert args.num_processes == 8 and args.use_deepspeed
    given = parser.parse_args(["--config_file", str(CONFIGS / name), "--num_processes", "2", "-m", "riskva_core.train"])
    args, _, _ = _validate_launch_command(given)
    assert args.num_processes == 2 and args.use_deepspeed


def test_dagster_k8s_instance_loads_with_the_installed_dagster(tmp_path, monkeypatch):
    """The instance schema, then each named class (run launcher, coordinator, storage) imported and its
    own config schema applied: a module dagster no longer has, or a misspelt field, fails here."""
    import importlib

    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config

    for var in ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB", "RISKVA_IMAGE"):
        monkeypatch.setenv(var, "x")
    (tmp_path / "dagster.yaml").write_text((CONFIGS / "scale_out" / "dagster_k8s_instance.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    for name in ("run_launcher", "run_coordinator"):
        section = config[name]
        klass = getattr(importlib.import_module(section["module"]), section["class"])
        result = process_config(klass.config_type(), section.get("config") or {})
        assert result.success, (name, [e.message for e in result.errors or []])
    from dagster_postgres import DagsterPostgresStorage

    postgres = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert postgres.success, [e.message for e in postgres.errors or []]
    assert postgres.value["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["run_coordinator"]["module"] == "dagster._core.run_coordinator"


def _pipes_env() -> dict[str, str]:
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param

    return {DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param({"env": {}}),
            DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param({"stdio": "stdout"})}


def test_k8s_training_pod_renders_with_dagster_k8s_and_matches_the_kubernetes_schema():
    """The pod PipesK8sClient would create (dagster-k8s's build_pod_body), checked by the Kubernetes client's
    own models: serialised to the API's JSON and deserialised back as a V1Pod, which rejects what the
    schema does not allow; then what training needs: GPUs, /dev/shm in memory, Pipes, the grace period."""
    import kubernetes

    from riskva_assets.launch_resources import render_training_pod
    from riskva_assets.resources import TrainingLauncher

    launcher = TrainingLauncher(launcher="k8s", num_processes=8)
    pod = render_training_pod(launcher, ["--model_name_or_path", "/data/m", "--output_dir", "/data/o"], _pipes_env())
    api = kubernetes.client.ApiClient()
    body = api.sanitize_for_serialization(pod)

    class _Response:  # the client's deserializer reads an HTTP response's body
        data = json.dumps(body)

    again = api.deserialize(_Response(), "V1Pod")
    assert api.sanitize_for_serialization(again) == body
    spec = again.spec
    (container,) = spec.containers
    assert container.resources.limits["nvidia.com/gpu"] == "8" == container.resources.requests["nvidia.com/gpu"]
    assert container.command[:2] == ["accelerate", "launch"] and "riskva_assets.pipes_rank" in container.command
    assert container.command[container.command.index("--num_processes") + 1] == "8"
    env = {e.name: e.value for e in container.env}
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES", "RISKVA_HOME"} <= set(env)
    # The ranks' own grace (torchrun's SIGKILL delay) fits inside the pod's.
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) <= spec.termination_grace_period_seconds >= 300
    shm = next(v for v in spec.volumes if v.empty_dir and v.empty_dir.medium == "Memory")
    assert any(m.mount_path == "/dev/shm" and m.name == shm.name for m in container.volume_mounts)
    assert spec.restart_policy == "Never" and again.metadata.namespace == "riskva"


def test_k8s_pod_with_an_unknown_field_is_refused(tmp_path):
    from riskva_assets.launch_resources import render_training_pod
    from riskva_assets.resources import TrainingLauncher

    manifest = yaml.safe_load((CONFIGS / "scale_out" / "k8s_training_pod.yaml").read_text())
    manifest["spec"]["containers"][0]["resource"] = manifest["spec"]["containers"][0].pop("resources")
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(Exception, match="Unexpected keys in model class V1Container: {'resource'}"):
        render_training_pod(TrainingLauncher(launcher="k8s", num_processes=8, k8s_pod_spec=str(tmp_path / "pod.yaml")),
                            [], _pipes_env())


def test_mlflow_server_env_names_postgres_driver_and_s3():
    env = dict(
        line.split("=", 1)
        for line in (CONFIGS / "scale_out" / "mlflow_server.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # SQLAlchemy 2.1 opens a bare postgresql:// with psycopg 3; the URI names psycopg2.
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
