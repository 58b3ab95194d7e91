"""Helpers for benchmarks/gpu_check.sh: GPU memory sampling, batched-inference timing, the JSON.

    python benchmarks/gpu_check.py sample-gpu-memory OUT_FILE        # until killed: peak MiB used
    python benchmarks/gpu_check.py infer MODEL DATA OUT_JSON [--max_new_tokens N] [--batch_sizes 1 8]
    python benchmarks/gpu_check.py collect WORK OUT_JSON

The training and merge figures come from the project's own entry points (the shell script runs
`accelerate launch -m riskva_core.train` and `riskva merge`); this file only measures. Peak GPU
memory is sampled from outside (nvidia-smi, every 0.2 s) so it counts whatever the training
engine allocates, CUDA context included, the way published anchors (ms-swift's 20-22 GiB for
7B LoRA) are read off nvidia-smi too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWIFT_ANCHOR_GIB = [20, 22]


def sample_gpu_memory(out: Path, interval: float = 0.2) -> None:
    """Write the peak `memory.used` (MiB, summed over visible GPUs) to ``out`` after every sample."""
    peak = 0
    while True:
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10).stdout
            used = sum(int(x) for x in text.split() if x.strip().isdigit())
        except (OSError, subprocess.TimeoutExpired):
            used = 0
        if used > peak:
            peak = used
            out.write_text(str(peak))
        time.sleep(interval)


def bench_infer(model: str, data: Path, out: Path, max_new_tokens: int, batch_sizes: list[int], n_images: int) -> None:
    """Greedy generation tokens/s per batch size on the same images, through riskva's Generator."""
    import torch

    from riskva_core.data.samples import read_samples
    from riskva_core.evaluate.infer import Generator

    gen = Generator(model, max_new_tokens=max_new_tokens)
    samples = [s for split in ("test", "val", "train") for s in read_samples(data, split)][:n_images]
    images = [s.load_image().convert("RGB") for s in samples]
    pad = gen.processor.tokenizer.pad_token_id
    results = {}
    gen.generate(images[:1])  # warm-up: kernels, allocator
    for bs in batch_sizes:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        new_tokens = 0
        for i in range(0, len(images), bs):
            batch = images[i:i + bs]
            enc = gen.processor(text=[gen.prompt] * len(batch), images=batch, padding=True,
                                return_tensors="pt").to(gen.device)
            with torch.inference_mode():
                ids = gen.model.generate(**enc, generation_config=gen.generation_config)
            new_tokens += int((ids[:, enc["input_ids"].shape[1]:] != pad).sum())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        results[str(bs)] = {"images": len(images), "new_tokens": new_tokens, "seconds": dt,
                            "tokens_per_s": new_tokens / dt}
    b = [str(x) for x in batch_sizes]
    out.write_text(json.dumps({
        "model": model, "dtype": gen.dtype, "device": str(gen.device), "max_new_tokens": max_new_tokens,
        "by_batch_size": results,
        "speedup": results[b[-1]]["tokens_per_s"] / results[b[0]]["tokens_per_s"] if len(b) > 1 else None,
    }, indent=2, sort_keys=True))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(work: Path, out: Path) -> None:
    """One JSON from the step files the shell script left in WORK."""
    info = _json(work / "model" / "tiny_model_info.json")
    metrics = _json(work / "train" / "adapter" / "metrics.json")
    final = metrics.get("final", metrics)
    merge_report = _json(work / "merged" / "merge_report.json")
    timings = {k: float(v) for k, v in (line.split() for line in (work / "timings.txt").read_text().splitlines()
                                         if line.strip())} if (work / "timings.txt").is_file() else {}
    peak_mib = int((work / "gpu_peak_mib.txt").read_text()) if (work / "gpu_peak_mib.txt").is_file() else None
    tokens_per_s = next((v for k, v in final.items() if "tokens_per_s" in k or "tokens_per_second" in k), None)
    result = {
        "mode": (work / "mode.txt").read_text().strip() if (work / "mode.txt").is_file() else None,
        "model": {"size": info.get("size"), "parameters": info.get("parameters"), "dtype": info.get("dtype")},
        "train": {
            "command": (work / "train_command.txt").read_text().strip() if (work / "train_command.txt").is_file() else None,
            "seconds": timings.get("train"),
            "peak_gpu_memory_gib": peak_mib / 1024 if peak_mib is not None else None,
            "anchor_ms_swift_7b_lora_gib": SWIFT_ANCHOR_GIB,
            "tokens_per_s": tokens_per_s,
            "final": final,
        },
        "merge": {
            "seconds": timings.get("merge"),
            "dtype": merge_report.get("dtype"),
            "max_abs_logit_diff": merge_report.get("max_abs_logit_diff"),
            "tolerance_abs": merge_report.get("tolerance_abs"),
            "noise_abs_logit_diff": merge_report.get("noise_abs_logit_diff"),
            "answer_agreement": merge_report.get("answer_agreement"),
            "peak_rss_gb": merge_report.get("peak_rss_gb"),
            "warnings": merge_report.get("warnings"),
            "min_kept": merge_report.get("min_kept"),
            "lora_layers": merge_report.get("lora_layers"),
        },
        "infer": _json(work / "infer.json"),
        "build_model_seconds": timings.get("tiny_model"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample-gpu-memory")
    s.add_argument("out", type=Path)
    i = sub.add_parser("infer")
    i.add_argument("model")
    i.add_argument("data", type=Path)
    i.add_argument("out", type=Path)
    i.add_argument("--max_new_tokens", type=int, default=64)
    i.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    i.add_argument("--n_images", type=int, default=8)
    c = sub.add_parser("collect")
    c.add_argument("work", type=Path)
    c.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "sample-gpu-memory":
        sample_gpu_memory(a.out)
    elif a.cmd == "infer":
        bench_infer(a.model, a.data, a.out, a.max_new_tokens, a.batch_sizes, a.n_images)
    else:
        collect(a.work, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
