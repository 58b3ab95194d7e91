"""Host memory of the adapter save under DeepSpeed: how much RSS the ranks add while saving.

    python benchmarks/bench_save.py --model REAL_WIDTH_DIR [--code DIR ...] [--stage 2] [--ranks 2]

Trains one step of the real-width stand-in (`riskva tiny-model --size real-width`, bf16) with
``accelerate launch -m riskva_core.train`` on CPU ranks (DeepSpeed ZeRO-2 by default), while a
sampler reads the RSS of every process in the launch tree every 20 ms. The save window opens when
rank 0 creates the adapter's temporary folder (``OUT/.adapter.*.tmp``) and closes when the
finished ``OUT/adapter`` appears; the figure is the summed RSS at its peak inside the window minus
the sum at its start. ``--code`` runs the same launch with another checkout's riskva_core first on
PYTHONPATH (e.g. an export of the commit before the trainable-only save), one after the other, so
before and after are measured by one command. Heavy: run under ``flock /tmp/riskva_heavy.lock``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
FLAGS = ["--bf16", "--gradient_checkpointing", "--use_lora", "True", "--lora_r", "64", "--lora_alpha", "128",
         "--max_steps", "1", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
         "--min_pixels", "784", "--max_pixels", "3136", "--max_length", "512", "--save_strategy", "no",
         "--report_to", "none", "--learning_rate", "1e-4", "--eval_strategy", "no"]


def _cpu_flags() -> list[str]:
    """bf16 autocast on CPU ranks: upstream takes --bf16 without a GPU only with --use_cpu."""
    import torch

    return [] if torch.cuda.is_available() else ["--use_cpu"]


def _tree_rss(root) -> dict[int, int]:
    import psutil

    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.Error:
            pass
    return out


def measure(code: Path, model: Path, data: Path, out: Path, stage: int, ranks: int) -> dict:
    import psutil

    env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / f"configs/deepspeed_zero{stage}.yaml"),
           "--num_processes", str(ranks), "--main_process_port", str(29300 + os.getpid() % 500), "-m",
           "riskva_core.train", "--model_name_or_path", str(model), "--dataset_path", str(data),
           "--output_dir", str(out), *FLAGS, *_cpu_flags()]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    start = peak_in_save = peak_run = None
    t_open = t_close = None
    while proc.poll() is None:
        rss = sum(_tree_rss(root).values())
        peak_run = max(peak_run or 0, rss)
        saving = any(out.glob(".adapter.*.tmp")) if out.is_dir() else False
        if saving and start is None:
            start, t_open = rss, time.monotonic()
        if start is not None and t_close is None:
            peak_in_save = max(peak_in_save or 0, rss)
            if (out / "adapter").is_dir():
                t_close = time.monotonic()
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode != 0 or start is None:
        raise SystemExit(f"{code}: training failed or no save seen (rc {proc.returncode}):\n{err[-3000:]}")
    return {"code": str(code), "rss_at_save_start_gb": start / 1e9, "peak_in_save_gb": peak_in_save / 1e9,
            "save_increase_gb": (peak_in_save - start) / 1e9, "save_seconds": (t_close or time.monotonic()) - t_open,
            "peak_run_gb": peak_run / 1e9,
            "adapter_mb": (out / "adapter" / "adapter_model.safetensors").stat().st_size / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a real-width (or any) model folder")
    ap.add_argument("--code", type=Path, action="append", help="checkout(s) whose riskva_core to run (default: this)")
    ap.add_argument("--stage", type=int, default=2, choices=(2, 3), help="DeepSpeed ZeRO stage (default 2)")
    ap.add_argument("--ranks", type=int, default=2, help="CPU ranks (default 2)")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from model_fixtures import make_prepared_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = make_prepared_dataset(Path(tmp) / "data", 10, image_size=56)
        rows = [measure(c.resolve(), a.model, data, Path(tmp) / f"out{i}", a.stage, a.ranks)
                for i, c in enumerate(a.code or [REPO])]
    print(f"adapter save under DeepSpeed ZeRO-{a.stage}, {a.ranks} CPU ranks, summed RSS of the launch tree:")
    for r in rows:
        print(f"  {r['code']}: +{r['save_increase_gb']:.2f} GB during the save ({r['rss_at_save_start_gb']:.2f} → "
              f"{r['peak_in_save_gb']:.2f} GB, {r['save_seconds']:.1f} s); run peak {r['peak_run_gb']:.2f} GB; "
              f"adapter {r['adapter_mb']:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
