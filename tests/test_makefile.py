"""The Makefile's DS_ACCELERATOR: "cpu" only without a usable GPU, never exported empty."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _print_env(tmp_path: Path, nvidia_smi: str | None, **env: str) -> str:
    """``make -s print-env`` with PATH = a folder holding only make, sh and the given nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "sh", "bash", "echo"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(["make", "-s", "-C", str(ROOT), "print-env"], env={**base, "PATH": str(bin_dir), **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("inherited", [None, ""])
def test_a_gpu_host_leaves_ds_accelerator_unset(tmp_path, inherited):
    env = {} if inherited is None else {"DS_ACCELERATOR": inherited}
    assert _print_env(tmp_path, 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"', **env) == "DS_ACCELERATOR=<unset>"


@pytest.mark.parametrize("nvidia_smi", [None, "echo 'NVIDIA-SMI has failed' >&2; exit 9"])
def test_no_usable_gpu_means_cpu(tmp_path, nvidia_smi):
    assert _print_env(tmp_path, nvidia_smi) == "DS_ACCELERATOR=cpu"


def test_a_value_from_the_caller_is_kept(tmp_path):
    assert _print_env(tmp_path, None, DS_ACCELERATOR="cuda") == "DS_ACCELERATOR=cuda"


@pytest.mark.parametrize("target,what", [("browser", "chromium"), ("netns", "iproute2")])
def test_a_requirement_make_test_cannot_install_stops_make_under_ci_only(tmp_path, target, what):
    """Not root (a fake ``id``) and the tool absent from PATH: elsewhere the tests skip and make says so;
    under CI=true make stops, so CI never reports those tests as passed by skipping them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "sh", "bash", "echo", "ls"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "CI"}

    def make(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", "-C", str(ROOT), target], env={**base, "PATH": str(bin_dir), **env},
                              capture_output=True, text=True)

    local = make()
    assert local.returncode == 0 and f"make: {what} is missing;" in local.stdout and "will be skipped" in local.stdout
    ci = make(CI="true")
    assert ci.returncode != 0 and "will be skipped" not in ci.stdout + ci.stderr
    assert f"make: {what} is missing and could not be installed; under CI=true" in ci.stderr
