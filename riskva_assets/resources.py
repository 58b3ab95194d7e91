"""Resources: where data lives, where MLflow lives, how training is launched.

Each is a ``dg.ConfigurableResource`` whose fields can be set in the Launchpad or
from the environment with ``dg.EnvVar`` (see definitions.py):

    RISKVA_HOME                data root (default ./riskva_home)
    RISKVA_MLFLOW_TRACKING_URI default sqlite:///$RISKVA_HOME/mlflow/mlflow.db
    RISKVA_MLFLOW_REGISTRY_URI default: the tracking URI
    RISKVA_MLFLOW_ARTIFACT_ROOT artifact root for a database tracking URI (default $RISKVA_HOME/mlflow/artifacts)
    RISKVA_MLFLOW_UI_URL       link target in asset metadata (default http://127.0.0.1:5000)
    RISKVA_NUM_PROCESSES       training ranks (default 1)
    RISKVA_BASE_MODEL          base model: a folder, a hub id (from the HF cache; HF_HUB_OFFLINE honoured)
                               or a models:/ URI (default: build the demo tiny model)
    RISKVA_TRAIN_LAUNCHER      where lora_adapter trains: local (default) | ray | k8s (launchers.py)
    RISKVA_RAY_ADDRESS         the Ray cluster's dashboard/job address for the ray launcher, e.g. http://head:8265
"""
from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from riskva_core.paths import DataRoot, default_home
from riskva_core.registry.client import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("local", "ray", "k8s")


class DataRootResource(dg.ConfigurableResource):
    """The data root of riskva_core/paths.py; empty means $RISKVA_HOME or ./riskva_home."""

    root: str = Field(default="", description="Data root folder; empty: $RISKVA_HOME or ./riskva_home")

    def layout(self) -> DataRoot:
        return DataRoot(Path(self.root) if self.root else default_home())


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry; defaults to sqlite and local artifacts under the data root."""

    paths: DataRootResource
    tracking_uri: str = Field(default="", description="Empty: sqlite:///<root>/mlflow/mlflow.db")
    registry_uri: str = Field(default="", description="Empty: same as the tracking URI")
    ui_url: str = Field(default="http://127.0.0.1:5000", description="MLflow UI base URL for links")
    artifact_root: str = Field(
        default="", description="Artifact root (folder or URI) for a database tracking URI such as "
        "postgresql://…; empty: <root>/mlflow/artifacts. Ignored with an http:// tracking server, which "
        "stores artifacts itself")

    def registry(self) -> Registry:
        root = self.paths.layout()
        if self.tracking_uri:
            artifact_root = None
            if not self.tracking_uri.startswith(("http://", "https://", "databricks")):
                # A database backend keeps no artifacts: without a root MLflow would write ./mlruns in the cwd.
                artifact_root = self.artifact_root or str(root.mlflow_artifact_root)
            return Registry(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or None,
                            artifact_root=artifact_root, ui_url=self.ui_url)
        return Registry.under(root, registry_uri=self.registry_uri or None, ui_url=self.ui_url)


class TrainingLauncher(dg.ConfigurableResource):
    """How ``lora_adapter`` starts training: ``accelerate launch`` with the DeepSpeed config, here (local),
    as a Ray job across a cluster's nodes (ray) or in one Kubernetes pod (k8s); see launchers.py."""

    launcher: str = Field(default="local", description="local: a subprocess on this host | ray: a job on the "
                          "Ray cluster at ray_address, one rank per placement-group bundle | k8s: one pod "
                          "(k8s_pod_spec) through dagster_k8s.PipesK8sClient")
    num_processes: int = Field(default=0, description="Ranks; 0 (default): local: one per GPU visible to "
                               "this host, 1 without a GPU; ray/k8s: required (Ray workers / ranks in the pod)")
    accelerate_config: str = Field(
        default="configs/deepspeed_zero2.yaml",
        description="accelerate config file (relative paths are relative to the repository); the ray "
        "launcher runs its DeepSpeed JSON",
    )
    base_model_path: str = Field(
        default="",
        description="Base model: a folder, a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct, from the Hugging Face "
        "cache) or a models:/ URI; it also picks the training recipe (auto); empty: build the demo model",
    )
    termination_timeout_s: float = Field(
        default=600.0, description="On cancel: seconds every rank gets to checkpoint before SIGKILL"
    )
    extra_env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the ranks")
    preemption_retries: int = Field(
        default=3, description="A run stopped by a SIGTERM that Dagster did not send (spot reclaim, node drain) "
        "after its checkpoint is retried this many times, each resuming from that checkpoint")
    ray_address: str = Field(default="", description="ray: the cluster's job server (dashboard) address, "
                             "e.g. http://ray-head:8265; empty: RAY_ADDRESS")
    ray_placement: str = Field(default="PACK", description="ray: placement-group strategy for the ranks: PACK "
                               "(fill a node first) | SPREAD | STRICT_SPREAD (one rank per node) | STRICT_PACK")
    ray_cpus_per_rank: float = Field(default=1.0, description="ray: CPUs reserved per rank")
    ray_gpus_per_rank: float = Field(default=1.0, description="ray: GPUs reserved per rank (0 on CPU nodes)")
    k8s_pod_spec: str = Field(default="configs/scale_out/k8s_training_pod.yaml",
                              description="k8s: the training pod's manifest (metadata + spec)")
    k8s_image: str = Field(default="", description="k8s: image of the training container; empty: the manifest's")

    @field_validator("launcher", mode="before")
    @classmethod
    def _known_launcher(cls, value: str) -> str:
        # dg.EnvVar("RISKVA_TRAIN_LAUNCHER") is checked when Dagster resolves it at run time.
        if not isinstance(value, dg.EnvVar) and value not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, not {value!r}")
        return value

    def ranks(self) -> int:
        """num_processes, with 0 resolved where the local launcher runs: every visible GPU, as the
        seed's launch line does on an 8-GPU host (1 CPU rank without a GPU)."""
        if self.num_processes > 0:
            return self.num_processes
        if self.launcher != "local":
            raise dg.Failure(f"num_processes must be set for the {self.launcher} launcher (RISKVA_NUM_PROCESSES): "
                             "this host's GPUs say nothing about the cluster's")
        import torch

        return max(torch.cuda.device_count() if torch.cuda.is_available() else 0, 1)

    def config_path(self) -> Path:
        path = Path(self.accelerate_config)
        return path if path.is_absolute() else REPO_ROOT / path

    def command(self, module_args: list[str]) -> list[str]:
        """The command the launcher runs: ``accelerate launch`` of riskva_assets.pipes_train (local, and in
        the k8s pod), or the Ray job's driver (riskva_assets.ray_driver) that starts the ranks."""
        from .launchers import launcher_command

        return launcher_command(self, module_args)

    def env_vars(self) -> dict[str, str]:
        # torchrun's elastic agent (inside `accelerate launch`) SIGKILLs its workers 30 s after it is
        # signalled unless told otherwise; give the ranks the same grace as the Pipes client, so a
        # cancel lets every rank finish its checkpoint.
        return {"PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(self.termination_timeout_s)),
                **self.extra_env}

    def client(self) -> dg.PipesSubprocessClient:
        from .pipes_client import ProcessGroupPipesClient

        return ProcessGroupPipesClient(
            cwd=str(REPO_ROOT),
            forward_termination=True,
            termination_timeout_seconds=self.termination_timeout_s,
        )

    def run(self, context: dg.AssetExecutionContext, command: list[str],
            extra_env: dict[str, str] | None = None) -> dg.PipesClientCompletedInvocation:
        """Run ``command`` (from :meth:`command`) with this launcher's Pipes client."""
        from .launchers import launch

        return launch(context, self, command, extra_env)

    def describe(self, module_args: list[str]) -> str:
        return shlex.join(self.command(module_args))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
