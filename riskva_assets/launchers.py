"""Where ``lora_adapter`` trains: one asset, three launchers (TrainingLauncher.launcher).

- ``local`` (default): ``accelerate launch`` as a Pipes subprocess on the Dagster run's host
  (pipes_client.ProcessGroupPipesClient). Right for one 8-GPU box.
- ``ray``: a job on an existing Ray cluster through dagster-ray's ``PipesRayJobClient``. The job's
  driver (riskva_assets.ray_driver) reserves one placement-group bundle per rank, spread over the
  cluster's nodes as ``ray_placement`` says, and runs the same ``riskva_assets.pipes_train`` entry on
  each with the same DeepSpeed JSON; rendezvous (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) comes
  from where Ray placed the ranks. Rank 0's Pipes messages reach Dagster through the job's log.
- ``k8s``: one pod through ``dagster_k8s.PipesK8sClient`` with the manifest ``k8s_pod_spec``
  (configs/scale_out/k8s_training_pod.yaml), running the local launcher's ``accelerate launch``.

All three keep what the asset does around the launch: the run identity and resume decision
(resume.py), lineage metadata, the ``gpu`` pool, rank 0's metrics and logs through Pipes, and
cancel → every rank checkpoints (local: SIGTERM to the process group; ray: the job is stopped,
its driver SIGTERMs every rank and gets ``termination_timeout_s`` before Ray kills it; k8s: the pod
is deleted and Kubernetes gives it terminationGracePeriodSeconds).

The data root (RISKVA_HOME) must be the same path on every machine that trains or reads the result
(a shared file system or volume): the asset passes absolute dataset/output paths and reads the
adapter and checkpoints back from them.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from .resources import REPO_ROOT, TrainingLauncher, free_port

RAY_DRIVER = "riskva_assets.ray_driver"
# How long the Dagster side waits for a stopped Ray job beyond the ranks' grace (driver exit, log flush).
RAY_STOP_SLACK_S = 60.0


def deepspeed_json(launcher: TrainingLauncher) -> str:
    """The DeepSpeed JSON named by the accelerate config, relative to the repository when it is inside it:
    the ray launcher's ranks get it as ``--deepspeed``, so every launcher trains with the same file."""
    config = yaml.safe_load(launcher.config_path().read_text(encoding="utf-8")) or {}
    name = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not name:
        from riskva_core.errors import RiskvaError

        raise RiskvaError(f"{launcher.config_path()}: no deepspeed_config.deepspeed_config_file; the ray "
                          "launcher needs the DeepSpeed JSON its ranks train with")
    return name


def launcher_command(launcher: TrainingLauncher, module_args: list[str]) -> list[str]:
    """The command line the launcher runs (also what the asset records as its lineage)."""
    if launcher.launcher == "ray":
        # Runs on the Ray head: the cluster's own `python` (riskva installed there) and repository paths.
        return ["python", "-m", RAY_DRIVER,
                "--num_ranks", str(launcher.ranks()),
                "--deepspeed_config", deepspeed_json(launcher),
                "--placement", launcher.ray_placement,
                "--cpus_per_rank", str(launcher.ray_cpus_per_rank),
                "--gpus_per_rank", str(launcher.ray_gpus_per_rank),
                "--", *module_args]
    in_pod = launcher.launcher == "k8s"
    return [
        # In the pod: the image's accelerate, and the config relative to its working directory (the checkout).
        "accelerate" if in_pod else str(Path(sys.executable).with_name("accelerate")), "launch",
        "--config_file", launcher.accelerate_config if in_pod else str(launcher.config_path()),
        "--num_processes", str(launcher.ranks()),
        # A free port per run here: concurrent runs (or tests) on one host must not collide on 29500.
        "--main_process_port", "29500" if in_pod else str(free_port()),
        "-m", "riskva_assets.pipes_train",
        *module_args,
    ]


def launch(context: dg.AssetExecutionContext, launcher: TrainingLauncher, command: list[str],
           extra_env: dict[str, str] | None = None) -> dg.PipesClientCompletedInvocation:
    """Run ``command`` with the launcher's Pipes client; the single dispatch point of lora_adapter.

    ``extra_env`` is this run's own environment (the pinned base model's folder for every rank)."""
    env = {**launcher.env_vars(), **(extra_env or {})}
    if launcher.launcher == "ray":
        return ray_client(launcher).run(context=context, submit_job_params={
            "entrypoint": shlex.join(command),
            # RAY_JOB_STOP_WAIT_TIME_S: after a stop, the job supervisor SIGKILLs the driver this much later
            # (3 s by default): the driver needs the same grace as the ranks it is stopping.
            "runtime_env": {"env_vars": {**env, "RAY_JOB_STOP_WAIT_TIME_S": str(int(launcher.termination_timeout_s))}},
            # The driver only places and watches the ranks: it reserves no CPU a rank could use.
            "entrypoint_num_cpus": 0,
        })
    if launcher.launcher == "k8s":
        from dagster_k8s import PipesK8sClient

        meta, spec = training_pod_manifest(launcher)
        return PipesK8sClient().run(context=context, image=launcher.k8s_image or None, command=command,
                                    namespace=meta.get("namespace"), env=env, base_pod_meta=meta,
                                    base_pod_spec=spec)
    return launcher.client().run(context=context, command=command, env=env)


def ray_client(launcher: TrainingLauncher):
    from dagster_ray import PipesRayJobClient

    class StopWaitsForCheckpoints(PipesRayJobClient):
        """``PipesRayJobClient`` that, on cancel, waits for the stopped job to end: the Dagster run then ends
        after every rank's checkpoint is written, as with the local launcher (upstream returns at once)."""

        def _terminate(self, context, job_id: str) -> None:
            super()._terminate(context, job_id)
            deadline = time.monotonic() + launcher.termination_timeout_s + RAY_STOP_SLACK_S
            while not self.client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
                time.sleep(self.poll_interval)
            context.log.info(f"Ray job {job_id}: {self.client.get_job_status(job_id).value}")

    return StopWaitsForCheckpoints(address=launcher.ray_address or None, forward_termination=True)


def training_pod_manifest(launcher: TrainingLauncher) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, spec) of the training pod manifest; the name is the client's (one per run and step)."""
    path = Path(launcher.k8s_pod_spec)
    manifest = yaml.safe_load((path if path.is_absolute() else REPO_ROOT / path).read_text(encoding="utf-8"))
    meta = {k: v for k, v in (manifest.get("metadata") or {}).items() if k not in ("name", "generateName")}
    return meta, dict(manifest["spec"])


def render_training_pod(launcher: TrainingLauncher, module_args: list[str], pipes_env: dict[str, str],
                        pod_name: str = "riskva-train"):
    """The ``kubernetes.client.V1Pod`` PipesK8sClient would create, built by dagster-k8s's own builder
    (``build_pod_body``: the Kubernetes client's models, which reject unknown fields)."""
    from dagster_k8s.pipes import build_pod_body

    meta, spec = training_pod_manifest(launcher)
    return build_pod_body(pod_name=pod_name, image=launcher.k8s_image or None,
                          command=launcher_command(launcher, module_args),
                          env_vars={**pipes_env, **launcher.env_vars()}, base_pod_meta=meta, base_pod_spec=spec)
