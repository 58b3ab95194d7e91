"""What each launcher runs, built without Dagster: the command line, the ranks' environment and the
Kubernetes pod's inputs. ``riskva_assets.launch_resources.TrainingLauncher`` (the Dagster resource)
describes itself as a :class:`LaunchSpec` and hands it here, so the command the asset records as
its lineage, the pod ``render_training_pod`` validates and the pod ``launch`` submits all come from
these functions.

- ``local``: ``accelerate launch --config_file <yaml> --num_processes N -m <rank module> <flags>``.
- ``k8s``: the same line inside the pod (the image's ``accelerate``, configs relative to its checkout).
- ``ray``: ``python -m riskva_assets.ray_train <scaling flags> -- <flags>``, the Ray job's
  entrypoint, which runs Ray Train's ``TorchTrainer`` (riskva_assets/ray_train.py).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path
from typing import Any

from riskva_core.errors import RiskvaError

REPO_ROOT = Path(__file__).resolve().parents[2]
# The entries the command lines start, named, never imported: they speak Dagster Pipes, so they live
# in riskva_assets (riskva_core never imports dagster or dagster_pipes).
RANK_MODULE = "riskva_assets.pipes_rank"
RAY_ENTRY = "riskva_assets.ray_train"
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# The Pipes message file of a pod run, under the run's output dir on the shared data root.
PIPES_DIR = "pipes"


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """How a training job is started (the fields of the Dagster resource, resolved)."""

    launcher: str = "local"  # local | ray | k8s
    ranks: int = 1
    accelerate_config: str = "configs/deepspeed_zero2.yaml"
    rank_module: str = RANK_MODULE
    termination_timeout_s: float = 600.0
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)
    ray_placement: str = "PACK"
    ray_cpus_per_rank: float = 1.0
    ray_gpus_per_rank: float = 1.0
    ray_max_failures: int = 0
    k8s_pod_spec: str = "configs/scale_out/k8s_training_pod.yaml"
    k8s_image: str = ""

    def config_path(self) -> Path:
        return _repo_path(self.accelerate_config)


def _repo_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else REPO_ROOT / path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flag_value(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``args`` (the last one, as argparse reads it)."""
    found = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def deepspeed_json(spec: LaunchSpec) -> str:
    """The DeepSpeed JSON named by the accelerate config, as the config names it (relative to the
    repository): the ray launcher's ranks get it as ``--deepspeed``, so every launcher trains with
    the same file."""
    import yaml

    config = yaml.safe_load(spec.config_path().read_text(encoding="utf-8")) or {}
    name = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not name:
        raise RiskvaError(f"{spec.config_path()}: no deepspeed_config.deepspeed_config_file; the ray "
                          "launcher needs the DeepSpeed JSON its ranks train with")
    return name


def check_gpus_per_rank(gpus: float) -> int:
    """0 (CPU ranks) or 1: a DeepSpeed data-parallel rank drives exactly one GPU. Ray Train would
    give a rank of 0.5 GPU the same device as its neighbour (NCCL refuses two ranks on one device)
    and a rank of 2 GPUs a second device nothing in the rank uses; more GPUs are more ranks."""
    if gpus not in (0, 1):
        raise RiskvaError(f"ray_gpus_per_rank {gpus:g}: a rank trains on 0 (CPU) or 1 GPU; for more GPUs "
                          "raise num_processes (one rank per GPU), fractions would share a device between ranks")
    return int(gpus)


def launcher_command(spec: LaunchSpec, module_args: list[str]) -> list[str]:
    """The command line the launcher runs (also what the asset records as its lineage)."""
    if spec.launcher == "ray":
        if spec.ray_placement not in PLACEMENTS:
            raise RiskvaError(f"ray_placement {spec.ray_placement!r}: one of {', '.join(PLACEMENTS)}")
        # Runs on the Ray head: the cluster's own `python` (riskva installed there) and repository paths.
        return ["python", "-m", RAY_ENTRY,
                "--num_ranks", str(spec.ranks),
                "--deepspeed_config", deepspeed_json(spec),
                "--placement", spec.ray_placement,
                "--cpus_per_rank", str(spec.ray_cpus_per_rank),
                "--gpus_per_rank", str(check_gpus_per_rank(spec.ray_gpus_per_rank)),
                "--max_failures", str(spec.ray_max_failures),
                "--rank_module", spec.rank_module,
                "--", *module_args]
    in_pod = spec.launcher == "k8s"
    return [
        # In the pod: the image's accelerate, and the config relative to its working directory (the checkout).
        "accelerate" if in_pod else str(Path(sys.executable).with_name("accelerate")), "launch",
        "--config_file", spec.accelerate_config if in_pod else str(spec.config_path()),
        "--num_processes", str(spec.ranks),
        # A free port per run here: concurrent runs (or tests) on one host must not collide on 29500.
        "--main_process_port", "29500" if in_pod else str(free_port()),
        "-m", spec.rank_module,
        *module_args,
    ]


def rank_env(spec: LaunchSpec) -> dict[str, str]:
    """The environment every launcher gives the ranks (before the run's own and the Pipes variables)."""
    # torchrun's elastic agent (inside `accelerate launch`) SIGKILLs its workers 30 s after it is
    # signalled unless told otherwise; give the ranks the same grace as the launcher, so a cancel
    # lets every rank finish its checkpoint.
    env = {"PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(spec.termination_timeout_s))}
    if spec.launcher == "local":
        env["PATH"] = venv_first_path()
    return {**env, **spec.extra_env}


def venv_first_path(path: str | None = None) -> str:
    """``path`` (default $PATH) with this interpreter's folder first, as an activated venv has it.

    DeepSpeed JIT-compiles its CPU ops (the shm all-reduce of CPU ranks) with whichever ``ninja`` comes
    first on PATH. The venv's (pip's ninja 1.13) and the system's (Debian's 1.11) record different
    command hashes in the same build log, so ranks started alternately with and without the venv's
    folder on PATH rebuilt the op on every switch: 26 s per launch on 2 cores (2026-12-07). The
    ranks run this interpreter, so they get its tools too."""
    here = str(Path(sys.executable).parent)
    rest = [p for p in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep) if p and p != here]
    return os.pathsep.join([here, *rest])


def pipes_messages_path(command: list[str], run_id: str) -> Path:
    """Where a pod's rank 0 writes its Pipes messages: a file of its own under the run's output dir on
    the shared data root, never the pod's log, which it shares with every rank's progress bars."""
    out = flag_value(command, "--output_dir")
    if not out:
        raise RiskvaError("the k8s launcher needs --output_dir on the shared data root for the Pipes messages")
    return Path(out) / PIPES_DIR / f"{run_id}.jsonl"


def pod_inputs(spec: LaunchSpec, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The one description of the training pod: what ``PipesK8sClient.run`` gets to build it and what
    ``render_training_pod`` builds it from (metadata and spec from ``k8s_pod_spec``, the pod's name is
    the client's, one per run and step)."""
    import yaml

    manifest = yaml.safe_load(_repo_path(spec.k8s_pod_spec).read_text(encoding="utf-8"))
    meta = {k: v for k, v in (manifest.get("metadata") or {}).items() if k not in ("name", "generateName")}
    return {"image": spec.k8s_image or None, "command": list(command), "namespace": meta.get("namespace"),
            "env": {**rank_env(spec), **env}, "base_pod_meta": meta, "base_pod_spec": dict(manifest["spec"])}
