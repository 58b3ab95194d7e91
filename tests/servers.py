"""Subprocess servers for tests: start on a free loopback port, wait until ready, always stop.

    with ServerProcess([...cmd...], env=env, log=tmp / "server.log") as srv:
        srv.wait_http(f"http://127.0.0.1:{port}/ping", timeout=120)
        ...

Each server runs in its own session (process group) so that stopping it also stops what
it started (MLflow's uvicorn, dagster's code-server); output goes to a log file whose
tail is put into every failure message.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, name: str | None = None):
        self.command = [str(c) for c in command]
        self.log = Path(log)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.command[0]).name
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=handle,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            handle.close()
        return self

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def fail_message(self, what: str) -> str:
        state = "running" if self.alive() else f"exited with {self.proc.returncode if self.proc else '?'}"
        return f"{self.name}: {what} ({state}); log tail:\n{self.tail()}"

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive():
                raise AssertionError(self.fail_message(f"died while waiting for {what}"))
            time.sleep(interval)
        raise AssertionError(self.fail_message(f"not {what} after {timeout:.0f}s"))

    def wait_http(self, url: str, timeout: float, status: int = 200) -> None:
        def ok() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return resp.status == status
            except (urllib.error.URLError, OSError):
                return False

        self.wait_until(ok, timeout, f"answering {url}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after ``grace`` s."""
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: the group id is the pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # stragglers (a worker that ignored SIGTERM) and a leader that did not exit
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class ThreadServer:
    """An ASGI app under a real uvicorn on a free loopback port, in a thread of this process (so a
    test can plant faults in the loaded model); stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", timeout_keep_alive=30))
        self.thread = None

    def __enter__(self) -> "ThreadServer":
        import threading

        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError(f"uvicorn on {self.url} did not start")
            time.sleep(0.05)
        return self

    def wait_ready(self, path: str = "/ready", timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.url}{path} not ready after {timeout:.0f}s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
