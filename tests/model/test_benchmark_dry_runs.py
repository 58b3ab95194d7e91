"""The benchmark scripts' --dry-run: the same steps on the tiny model, on the CPU.

* benchmarks/full_7b_cpu.sh: the full 7B architecture's run (RESULTS.md records it; ~20 GB of
  this box, a benchmark, not a test). Checks that each step is the product's own command and passes
  with the defaults: the 7B recipe picked from the base model by hub id, a DeepSpeed checkpoint, the
  merge gate, inference, one registration that writes the model once, one served request answered
  with the four fields.
* benchmarks/gpu_check.sh: its CPU-side logic end to end (tiny model, CPU, 2 steps).

Both scripts start at once (each step is one mostly single-threaded process, and each picks its
own free ports), each test then waits for its own.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from riskva_core.schema import FIELDS

REPO = Path(__file__).resolve().parents[2]


def _start(script: str, args: list[str], env: dict, tmp: Path) -> subprocess.Popen:
    with (tmp / (Path(script).stem + ".log")).open("wb") as log:  # the child keeps its own handle
        return subprocess.Popen(["bash", str(REPO / script), *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                                env=dict(os.environ, PYTHONPATH=str(REPO), **env))


def _finished(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry_runs")
    full = _start("benchmarks/full_7b_cpu.sh", ["--dry-run", "--keep", str(tmp / "full.json")],
                  {"FULL_7B_WORK": str(tmp / "work")}, tmp)
    gpu = _start("benchmarks/gpu_check.sh", ["--dry-run", str(tmp / "gpu_check.json")],
                 {"GPU_CHECK_WORK": str(tmp / "gpu_work")}, tmp)
    try:
        yield tmp, full, gpu
    finally:
        for proc in (full, gpu):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_full_7b_dry_run_trains_merges_infers_registers_and_serves_with_default_flags(dry_runs):
    tmp, full, _ = dry_runs
    _finished(full, tmp / "full_7b_cpu.log")
    out, work = tmp / "full.json", tmp / "work"
    result = json.loads(out.read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["build_model", "train", "merge", "infer", "register", "serve"]
    assert all(s["rc"] == 0 and s["seconds"] > 0 and s["peak_rss_gib"] > 0 for s in steps.values())
    # No recipe or learning rate was passed: the base model (a hub id) chose the 7B LoRA recipe.
    args = json.loads((work / "train/adapter/training_args.json").read_text())
    assert float(args["learning_rate"]) == 1e-4 and args["bf16"] is True
    assert (work / "train/checkpoint-2").is_dir()
    assert (work / "merged/image_policy.json").is_file()
    predictions = json.loads((work / "infer/predictions.json").read_text())
    assert len(predictions) == 1 and "raw_output" in predictions[0]
    # The registry holds one copy of the weights (real files, not links), not two.
    def weights(root: Path) -> int:
        return sum(p.stat().st_size for p in root.rglob("*.safetensors") if not p.is_symlink())

    assert weights(work / "home" / "mlflow") == weights(work / "merged") > 0
    answer = steps["serve"]["answer"]
    assert answer["status"] == 200
    row = answer["body"]["predictions"][0]
    assert not row["error"] and set(FIELDS) <= set(row)


def test_gpu_check_dry_run_trains_with_the_7b_recipe_merges_infers_and_writes_one_json(dry_runs):
    tmp, _, gpu = dry_runs
    _finished(gpu, tmp / "gpu_check.log")
    out = tmp / "gpu_check.json"
    result = json.loads(out.read_text())
    assert result["mode"] == "dry" and result["model"]["size"] == "tiny"
    train = result["train"]
    # The default 7B LoRA recipe went through riskva_core.train itself.
    cmd = train["command"]
    assert "-m riskva_core.train" in cmd and "--learning_rate 0.0001" in cmd and "--bf16 True" in cmd
    assert "--gradient_checkpointing True" in cmd and "--per_device_train_batch_size 2" in cmd
    assert train["tokens_per_s"] > 0 and train["seconds"] > 0 and train["anchor_ms_swift_7b_lora_gib"] == [20, 22]
    assert result["merge"]["seconds"] > 0 and result["merge"]["lora_layers"] > 0
    # The default merge (no --max_update_error): judged by its outputs against the dtype's own noise.
    merge = result["merge"]
    assert merge["noise_abs_logit_diff"] > 0 and merge["max_abs_logit_diff"] <= merge["tolerance_abs"]
    assert merge["answer_agreement"] == 1
    infer = result["infer"]["by_batch_size"]
    assert set(infer) == {"1", "8"} and all(v["tokens_per_s"] > 0 and v["images"] == 8 for v in infer.values())
    assert result["infer"]["speedup"] > 0
    assert result["vllm"] == {"skipped": "a dry run on CPU: nothing about vLLM is run or claimed"}
