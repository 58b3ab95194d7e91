"""benchmarks/gpu_check.sh: its CPU-side logic end to end in --dry-run (tiny model, CPU, 2 steps)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_trains_with_the_7b_recipe_merges_infers_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path / "work"), PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
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
