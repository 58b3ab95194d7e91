"""benchmarks/full_7b_cpu.sh: the same commands, default flags, on the tiny model in --dry-run.

The full run (the 7B architecture, ~20 GB of this box) is a benchmark, not a test: RESULTS.md
records it. This checks that the script's steps are the product's own commands and that each
passes with the defaults: the 7B recipe picked from the base model by hub id, a DeepSpeed
checkpoint, the merge gate, inference, one registration that writes the model once, and one
served request answered with the four fields.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from riskva_core.schema import FIELDS

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_trains_merges_infers_registers_and_serves_with_default_flags(tmp_path):
    out = tmp_path / "full.json"
    work = tmp_path / "work"
    env = dict(os.environ, FULL_7B_WORK=str(work), PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "benchmarks/full_7b_cpu.sh"), "--dry-run", "--keep", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
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
