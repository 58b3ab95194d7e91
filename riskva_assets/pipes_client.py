"""A Pipes subprocess client that stops *every* training rank on cancel.

``dg.PipesSubprocessClient`` forwards termination by sending SIGINT to the one
process it started. Here that process is the ``accelerate launch`` wrapper; the
ranks are its children (torchrun workers), so a signal to the wrapper alone can
leave ranks running or kill them before they save. This client starts the command
in its own process group and, when the Dagster run is cancelled, sends SIGTERM to
that group. torchrun's elastic agent (inside ``accelerate launch``) forwards it to
every rank (each runs in its own session) and would SIGKILL them after its own
30 s default; TrainingLauncher.env_vars sets TORCH_ELASTIC_SHUTDOWN_TIMEOUT to the
same grace, so every rank's SIGTERM handler (riskva_core.train) saves a checkpoint
and exits. After ``termination_timeout_seconds`` anything still alive in the
launcher's process tree (a rank, a DataLoader worker) is killed, so nothing of the
run outlives it.

This is the ``local`` launcher's client; launchers.py runs the same command on a Ray cluster
(dagster-ray) or in a Kubernetes pod (dagster_k8s.PipesK8sClient) instead.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError, DagsterPipesExecutionError
from dagster._core.pipes.utils import open_pipes_session


class ProcessGroupPipesClient(dg.PipesSubprocessClient):
    """``PipesSubprocessClient`` whose cancel reaches every process the command spawned."""

    def run(  # type: ignore[override]
        self,
        *,
        context: dg.OpExecutionContext | dg.AssetExecutionContext,
        command: str | Sequence[str],
        extras: Mapping | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        with open_pipes_session(
            context=context,
            context_injector=self.context_injector,
            message_reader=self.message_reader,
            extras=extras,
        ) as session:
            process = subprocess.Popen(
                command,
                cwd=cwd or self.cwd,
                env={**os.environ, **self.env, **(env or {}), **session.get_bootstrap_env_vars()},
                start_new_session=True,  # its own process group: one signal reaches every rank
            )
            try:
                process.wait()
            except DagsterExecutionInterruptedError:
                if self.forward_termination:
                    context.log.warning(
                        "[pipes] run cancelled: SIGTERM to every training process; "
                        f"waiting up to {self.termination_timeout_seconds:.0f}s for checkpoints"
                    )
                    terminate_group(process, self.termination_timeout_seconds)
                raise
            if process.returncode != 0:
                raise DagsterPipesExecutionError(
                    f"training command failed with exit code {process.returncode}: {format_command(command)}"
                )
        return dg.PipesClientCompletedInvocation(session)


def _alive(procs: list) -> list:
    """The processes still running (zombies count as gone: their parent, or PID 1, reaps them later)."""
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants (psutil.Process objects), if still there."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def terminate_group(process: subprocess.Popen, timeout_s: float) -> int | None:
    """SIGTERM the launcher's process group, wait up to ``timeout_s`` for every process of the tree
    to exit, then SIGKILL whatever is left of it.

    The group signal reaches ``accelerate launch`` (torchrun's elastic agent) and anything else started
    in the group. torchrun starts each worker in its own session and forwards the signal to each
    worker's group itself (waiting TORCH_ELASTIC_SHUTDOWN_TIMEOUT before its own SIGKILL), so the
    workers are not signalled twice here; but if the agent dies first, its workers would be orphaned,
    so the survivors are found by walking the process tree, not only the group.
    """
    import psutil

    deadline = time.monotonic() + timeout_s
    tree = process_tree(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)  # start_new_session=True: the group id is the launcher's pid
    except ProcessLookupError:
        return process.poll()
    while time.monotonic() < deadline:
        # Children started after the signal (a DataLoader worker, a checkpoint writer) join the watch.
        tree = _alive(tree + [p for p in process_tree(process.pid) if p not in tree])
        if not tree:
            break
        time.sleep(0.2)
    for proc in _alive(tree):
        try:
            proc.kill()
        except psutil.Error:
            pass
    return process.wait()


def format_command(command: str | Sequence[str]) -> str:
    import shlex

    return command if isinstance(command, str) else shlex.join(command)
