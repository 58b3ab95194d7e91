"""Ending a local launcher's process tree: every rank gets SIGTERM and its grace, then nothing survives.

The local launcher starts ``accelerate launch`` in its own process group (``start_new_session``).
torchrun's elastic agent inside it starts each rank in its own session and forwards a SIGTERM to
each rank's group itself (waiting TORCH_ELASTIC_SHUTDOWN_TIMEOUT before its own SIGKILL), so the
ranks are not signalled twice here; but if the agent dies first its ranks would be orphaned, so
the survivors are found by walking the process tree, not only the group.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence


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
    to exit, then SIGKILL whatever is left of it."""
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
    return command if isinstance(command, str) else shlex.join(command)
