"""Registration on disk: a bf16 checkpoint loads in bf16 on a CPU, the weights are written once,
a killed or failed registration leaves no RUNNING run and no partial copy (storage.py, register.py).

The tiny model is re-saved in bf16 and padded with a 16 MB file, so that the bytes this process
writes (``wchar`` of /proc/self/io, which counts write() and sendfile()) are dominated by the
model folder: one copy is ~1x its size, MLflow's staging copy + upload would be ~2x.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from model_fixtures import make_prepared_dataset, make_tiny_model

from riskva_core.errors import RiskvaError
from riskva_core.paths import DataRoot
from riskva_core.registry import register as register_cli
from riskva_core.registry import storage
from riskva_core.registry.client import Registry

PADDING = 16 * 1024 * 1024

def _killed_registration(home: str, model: str, out) -> None:
    """A registration killed outright (SIGKILL: what the OOM killer sends) after part of its upload."""
    reg = Registry.under(DataRoot(home))
    mlflow.start_run(experiment_id=reg.activate(), run_name="killed", tags={storage.PROCESS_TAG: storage.process_tag()})
    logged = mlflow.initialize_logged_model(name="model")
    reg.client().log_model_artifacts(logged.model_id, model)
    out.send((mlflow.active_run().info.run_id, logged.model_id))
    os.kill(os.getpid(), signal.SIGKILL)


def _wchar() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("wchar")).split()[1])


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bf16_registered(tmp_path_factory):
    import torch
    from transformers import AutoModelForImageTextToText

    tmp = tmp_path_factory.mktemp("storage")
    ds = make_prepared_dataset(tmp / "ds", n=6)
    fp32 = make_tiny_model(tmp / "tiny", ds)
    model = tmp / "bf16"
    shutil.copytree(fp32, model)
    (model / "model.safetensors").unlink()
    AutoModelForImageTextToText.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(model)
    (model / "padding.bin").write_bytes(os.urandom(PADDING))
    os.chmod(model / "model.safetensors", 0o600)  # what safetensors writes outside atomic_dir
    home = tmp / "home"
    ctx = multiprocessing.get_context("fork")  # mlflow is imported already: seconds instead of a fresh interpreter
    receive, send = ctx.Pipe(duplex=False)
    killed = ctx.Process(target=_killed_registration, args=(str(home), str(model), send))
    killed.start()
    killed.join(120)
    assert killed.exitcode == -signal.SIGKILL
    killed_run, killed_model = receive.recv()
    # A registration that fails after its upload (MLflow refuses the model name when registering).
    failing = dataclasses.replace(Registry.under(DataRoot(home)), model_name="riskva:bad")
    with pytest.raises(MlflowException, match="Invalid model name"):
        failing.log_model(model, example_image=b"any bytes", model_config={"max_new_tokens": 2})
    with pytest.MonkeyPatch.context() as mp:  # `riskva register` with default flags: the data root's registry
        mp.setenv("RISKVA_HOME", str(home))
        mp.delenv("RISKVA_MLFLOW_TRACKING_URI", raising=False)
        before = _wchar()
        assert register_cli.main(["--model_path", str(model), "--max_new_tokens", "4"]) == 0
        written = _wchar() - before
    reg = Registry.under(DataRoot(home))
    return reg, model, written, killed_run, killed_model


def test_a_bf16_checkpoint_registers_and_loads_in_bf16_on_cpu(bf16_registered):
    reg, model, _, _, _ = bf16_registered
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    assert reg.alias_version("challenger") == "1"
    loaded = mlflow.pyfunc.load_model(reg.model_uri("challenger"))
    assert loaded.model_config["torch_dtype"] == "auto"
    assert str(loaded.unwrap_python_model()._generator.model.dtype) == "torch.bfloat16"


def test_registration_writes_the_model_once(bf16_registered):
    reg, model, written, _, _ = bf16_registered
    size = _folder_bytes(model)
    stored = storage.local_model_dir(reg.model_uri("1"), reg.tracking_uri)
    weights = stored / "artifacts" / "model_dir"
    assert not any(p.is_symlink() for p in weights.rglob("*"))
    assert _folder_bytes(weights) == size
    # The killed registration's partial upload is gone: the artifact root holds this one copy.
    assert _folder_bytes(Path(reg.artifact_root)) < size + 2**20
    assert size <= written < 1.5 * size, f"{written} bytes written for a {size}-byte model"
    assert (weights / "model.safetensors").stat().st_mode & 0o044 == 0o044  # group/other-readable


def test_a_killed_registration_is_ended_failed_and_its_partial_copy_deleted(bf16_registered):
    reg, _, _, killed_run, killed_model = bf16_registered
    client = reg.client()
    run = client.get_run(killed_run)
    assert run.info.status == "FAILED" and "was killed" in run.data.tags[storage.FAILURE_TAG]
    logged = client.get_logged_model(killed_model)
    assert str(logged.status) == "FAILED"
    partial = Path(logged.artifact_location.removeprefix("file://"))
    assert not partial.exists() or _folder_bytes(partial) == 0


def test_a_failed_registration_is_ended_failed_without_a_copy(bf16_registered):
    reg = bf16_registered[0]
    runs = reg.client().search_runs([reg.activate()])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]  # killed, failed, registered
    failed = [r for r in runs if r.info.status == "FAILED" and r.info.run_name != "killed"]
    assert len(failed) == 1 and "Invalid model name" in failed[0].data.tags[storage.FAILURE_TAG]
    # Its upload is gone too: test_registration_writes_the_model_once counts the whole artifact root.


def test_register_flags_are_checked_in_one_line(tmp_path):
    with pytest.raises(RiskvaError, match="--model_path .*: not a merged model folder"):
        register_cli.RegisterConfig(model_path=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RiskvaError, match="--torch_dtype float16 is refused"):
        register_cli.RegisterConfig(model_path=tmp_path, torch_dtype="float16")
