"""Where ``lora_adapter`` trains: the ``TrainingLauncher`` resource and its three Pipes clients.

The launch itself is Dagster-free and lives in riskva_core/launch/ (commands, the rank entry, the
Ray Train job, process-group handling); this module is the Dagster glue around it, through the
clients' public interfaces only (no underscore method of dagster, dagster-ray or dagster-k8s is
overridden or called; tests/test_layout.py checks):

- ``local`` (default): ``accelerate launch`` as a Pipes subprocess on the Dagster run's host
  (:class:`ProcessGroupPipesClient`, a ``dg.PipesClient``). Right for one 8-GPU box.
- ``ray``: a job on an existing Ray cluster through dagster-ray's ``PipesRayJobClient``; the job
  runs Ray Train's ``TorchTrainer`` (riskva_assets/ray_train.py). Rank 0's Pipes messages reach
  Dagster through the job's log.
- ``k8s``: one pod through ``dagster_k8s.PipesK8sClient`` with the manifest ``k8s_pod_spec``
  (configs/scale_out/k8s_training_pod.yaml), running the local launcher's ``accelerate launch``.
  Pipes messages travel in a file of their own on the shared data root (``dg.PipesFileMessageReader``),
  not in the pod log that every rank's progress bar writes to.

All three keep what the asset does around the launch: the run identity and resume decision, lineage
metadata, the ``gpu`` pool, rank 0's metrics and logs through Pipes, and cancel → every rank
checkpoints (local: SIGTERM to the process group; ray: the job is stopped, its driver asks every
rank to checkpoint and the Dagster side waits for the job to end; k8s: the pod is deleted and
Kubernetes gives it terminationGracePeriodSeconds).

The data root (RISKVA_HOME) must be the same path on every machine that trains or reads the result
(a shared file system or volume): the asset passes absolute dataset/output paths and reads the
adapter and checkpoints back from them.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from riskva_core.launch.commands import (RANK_MODULE, REPO_ROOT, LaunchSpec, launcher_command, pipes_messages_path,
                                         pod_inputs)
from riskva_core.launch.processes import format_command, terminate_group

LAUNCHERS = ("local", "ray", "k8s")
# How long the Dagster side waits for a stopped Ray job beyond the ranks' grace (driver exit, log flush).
RAY_STOP_SLACK_S = 60.0


class TrainingFailed(dg.Failure):
    """The training job ended without success (a crash, or a stop Dagster did not ask for)."""


class TrainingLauncher(dg.ConfigurableResource):
    """How ``lora_adapter`` starts training: ``accelerate launch`` with the DeepSpeed config, here (local),
    as a Ray Train job across a cluster's nodes (ray) or in one Kubernetes pod (k8s)."""

    launcher: str = Field(default="local", description="local: a subprocess on this host | ray: a Ray Train job "
                          "on the cluster at ray_address, one rank per worker | k8s: one pod (k8s_pod_spec) "
                          "through dagster_k8s.PipesK8sClient")
    num_processes: int = Field(default=0, description="Ranks; 0 (default): local: one per GPU visible to "
                               "this host, 1 without a GPU; ray/k8s: required (Ray Train workers / ranks in the pod)")
    accelerate_config: str = Field(
        default="configs/deepspeed_zero2.yaml",
        description="accelerate config file (relative paths are relative to the repository); the ray "
        "launcher runs its DeepSpeed JSON",
    )
    rank_module: str = Field(default=RANK_MODULE, description="Python module every rank runs: "
                             "riskva_assets.pipes_rank, or a module of yours whose main(argv, callbacks) wraps it "
                             "to add TrainerCallbacks")
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
    ray_placement: str = Field(default="PACK", description="ray: Ray Train's placement strategy for the ranks: "
                               "PACK (fill a node first) | SPREAD | STRICT_SPREAD (one rank per node) | STRICT_PACK")
    ray_cpus_per_rank: float = Field(default=1.0, description="ray: CPUs reserved per rank")
    ray_gpus_per_rank: float = Field(default=1.0, description="ray: GPUs per rank: 1, or 0 on CPU nodes (a "
                                     "DeepSpeed rank drives one GPU: fractions and several are refused)")
    ray_max_failures: int = Field(default=0, description="ray: Ray Train FailureConfig.max_failures: a failed "
                                  "worker group (a lost node, a crashed rank) is restarted this many times, "
                                  "resuming from the newest checkpoint the job wrote")
    k8s_pod_spec: str = Field(default="configs/scale_out/k8s_training_pod.yaml",
                              description="k8s: the training pod's manifest (metadata + spec)")
    k8s_image: str = Field(default="", description="k8s: image of the training container; empty: the manifest's")

    @field_validator("launcher", mode="before")
    @classmethod
    def known_launcher(cls, value: str) -> str:
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

    def spec(self) -> LaunchSpec:
        """This resource as riskva_core.launch describes a launch."""
        return LaunchSpec(
            launcher=self.launcher, ranks=self.ranks(), accelerate_config=self.accelerate_config,
            rank_module=self.rank_module, termination_timeout_s=self.termination_timeout_s,
            extra_env=dict(self.extra_env), ray_placement=self.ray_placement, ray_cpus_per_rank=self.ray_cpus_per_rank,
            ray_gpus_per_rank=self.ray_gpus_per_rank, ray_max_failures=self.ray_max_failures,
            k8s_pod_spec=self.k8s_pod_spec, k8s_image=self.k8s_image)

    def config_path(self) -> Path:
        path = Path(self.accelerate_config)
        return path if path.is_absolute() else REPO_ROOT / path

    def command(self, module_args: list[str]) -> list[str]:
        """The command the launcher runs: ``accelerate launch`` of the rank module (local, and in the
        k8s pod), or the Ray job's entrypoint (riskva_assets.ray_train)."""
        from riskva_core.errors import RiskvaError

        try:
            return launcher_command(self.spec(), module_args)
        except RiskvaError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None

    def env_vars(self) -> dict[str, str]:
        from riskva_core.launch.commands import rank_env

        return rank_env(self.spec())

    def run(self, context: dg.AssetExecutionContext, command: list[str],
            extra_env: dict[str, str] | None = None) -> dg.PipesClientCompletedInvocation:
        """Run ``command`` (from :meth:`command`) with this launcher's Pipes client."""
        return launch(context, self, command, extra_env)


class ProcessGroupPipesClient(dg.PipesClient):
    """A Pipes client for ``accelerate launch`` whose cancel reaches every rank (``dg.PipesClient``'s
    documented interface: ``run`` inside ``dg.open_pipes_session``).

    ``dg.PipesSubprocessClient`` sends SIGINT to the one process it started, here the
    ``accelerate launch`` wrapper; its ranks (torchrun workers) could be left running or killed
    before they save. This client starts the command in its own process group and, when the Dagster
    run is cancelled, sends SIGTERM to the group and waits ``termination_timeout_s`` for every rank's
    checkpoint before it kills what is left (riskva_core/launch/processes.py).
    """

    def __init__(self, cwd: str, termination_timeout_s: float):
        self.cwd = cwd
        self.termination_timeout_s = termination_timeout_s

    def run(self, *, context: dg.OpExecutionContext | dg.AssetExecutionContext,  # type: ignore[override]
            command: Sequence[str], env: Mapping[str, str] | None = None,
            extras: Mapping | None = None) -> dg.PipesClientCompletedInvocation:
        with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                                   message_reader=dg.PipesTempFileMessageReader(), extras=extras) as session:
            process = subprocess.Popen(
                list(command), cwd=self.cwd,
                env={**os.environ, **(env or {}), **session.get_bootstrap_env_vars()},
                start_new_session=True,  # its own process group: one signal reaches every rank
            )
            try:
                process.wait()
            except dg.DagsterExecutionInterruptedError:
                context.log.warning("[pipes] run cancelled: SIGTERM to every training process; "
                                    f"waiting up to {self.termination_timeout_s:.0f}s for checkpoints")
                terminate_group(process, self.termination_timeout_s)
                raise
            if process.returncode != 0:
                raise TrainingFailed(f"training command failed with exit code {process.returncode}: "
                                     f"{format_command(command)}")
        return dg.PipesClientCompletedInvocation(session)


def launch(context: dg.AssetExecutionContext, launcher: TrainingLauncher, command: list[str],
           extra_env: dict[str, str] | None = None) -> dg.PipesClientCompletedInvocation:
    """Run ``command`` with the launcher's Pipes client; the single dispatch point of lora_adapter.

    ``extra_env`` is this run's own environment (the pinned base model's folder for every rank)."""
    env = {**launcher.env_vars(), **(extra_env or {})}
    if launcher.launcher == "ray":
        return run_ray_job(context, launcher, command, env)
    if launcher.launcher == "k8s":
        return run_pod(context, launcher, command, extra_env or {})
    client = ProcessGroupPipesClient(cwd=str(REPO_ROOT), termination_timeout_s=launcher.termination_timeout_s)
    return client.run(context=context, command=command, env=env)


def run_ray_job(context: dg.AssetExecutionContext, launcher: TrainingLauncher, command: list[str],
                env: dict[str, str]) -> dg.PipesClientCompletedInvocation:
    """The Ray Train job through dagster-ray. On cancel upstream stops the job (forward_termination)
    and returns at once; here the Dagster run then waits for the stopped job to end, so it ends after
    every rank's checkpoint is written, as with the local launcher."""
    import shlex

    from dagster_ray import PipesRayJobClient
    from dagster_ray.core.pipes import generate_job_id
    from ray.job_submission import JobStatus

    client = PipesRayJobClient(address=launcher.ray_address or None, forward_termination=True)
    job_id = generate_job_id()  # ours, so that the job can be watched after upstream gives it up
    try:
        return client.run(context=context, submit_job_params={
            "entrypoint": shlex.join(command),
            "submission_id": job_id,
            # RAY_JOB_STOP_WAIT_TIME_S: after a stop, the job supervisor SIGKILLs the driver this much later
            # (3 s by default): the driver needs the same grace as the ranks it is stopping.
            "runtime_env": {"env_vars": {**env, "RAY_JOB_STOP_WAIT_TIME_S": str(int(launcher.termination_timeout_s))}},
            # The driver only waits on Ray Train: it reserves no CPU a rank could use.
            "entrypoint_num_cpus": 0,
        })
    except dg.DagsterExecutionInterruptedError:
        deadline = time.monotonic() + launcher.termination_timeout_s + RAY_STOP_SLACK_S
        while not client.client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
            time.sleep(1.0)
        context.log.info(f"Ray job {job_id}: {client.client.get_job_status(job_id).value}")
        raise
    except RuntimeError as exc:  # dagster-ray: the job ended FAILED or STOPPED
        if client.client.get_job_status(job_id) in (JobStatus.FAILED, JobStatus.STOPPED):
            raise TrainingFailed(f"Ray job {job_id} did not succeed: {exc}") from None
        raise


def run_pod(context: dg.AssetExecutionContext, launcher: TrainingLauncher, command: list[str],
            extra_env: dict[str, str]) -> dg.PipesClientCompletedInvocation:
    """The training pod through ``PipesK8sClient``, built from :func:`riskva_core.launch.commands.pod_inputs`
    (as :func:`render_training_pod` is), with Pipes messages in a file on the shared data root."""
    from dagster_k8s import PipesK8sClient

    messages = pipes_messages_path(command, context.run_id)
    messages.parent.mkdir(parents=True, exist_ok=True)
    reader = dg.PipesFileMessageReader(str(messages))
    return PipesK8sClient(message_reader=reader).run(context=context, **pod_inputs(launcher.spec(), command, extra_env))


def render_training_pod(launcher: TrainingLauncher, module_args: list[str], pipes_env: dict[str, str],
                        extra_env: dict[str, str] | None = None, pod_name: str = "riskva-train"):
    """The ``kubernetes.client.V1Pod`` that :func:`launch` has PipesK8sClient create for ``module_args``,
    built by dagster-k8s's own builder (``build_pod_body``: the Kubernetes client's models, which
    reject unknown fields) from the same :func:`pod_inputs`; ``pipes_env`` is the session's bootstrap
    environment, which the client puts first."""
    from dagster_k8s.pipes import build_pod_body

    pod = pod_inputs(launcher.spec(), launcher.command(module_args), extra_env or {})
    return build_pod_body(pod_name=pod_name, image=pod["image"], command=pod["command"],
                          env_vars={**pipes_env, **pod["env"]}, base_pod_meta=pod["base_pod_meta"],
                          base_pod_spec=pod["base_pod_spec"])
