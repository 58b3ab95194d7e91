"""Helpers for benchmarks/gpu_check.sh: GPU memory sampling, batched-inference timing, the JSON.

    python benchmarks/gpu_check.py sample-gpu-memory OUT_FILE        # until killed: peak MiB used
    python benchmarks/gpu_check.py infer MODEL DATA OUT_JSON [--max_new_tokens N] [--batch_sizes 1 8]
    python benchmarks/gpu_check.py vllm-parity MODEL DATA OUT_JSON [--max_new_tokens N] [--n_images N]
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served(command: list[str], env: dict, url: str, log: Path, ask, timeout: float = 900):
    """Start a server, wait for ``url/v1/models``, return ``ask(url)``; always stop it (its GPU memory too)."""
    import os
    import signal
    import urllib.request

    with log.open("ab") as handle:
        proc = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gpu_check: {command[0]} exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"gpu_check: {command[0]} not up after {timeout:.0f} s; see {log}")
            time.sleep(2)
        return ask(url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def vllm_parity(model: Path, data: Path, out: Path, max_new_tokens: int, n_images: int) -> bool:
    """Greedy answers of `vllm serve MODEL` against `riskva serve --api openai` on the test photos.

    The merged folder is a standard Hugging Face folder, so vLLM serves it as is. Each engine gets
    what riskva's own path feeds the model: the photo after the model's image policy (sent to vLLM
    losslessly as PNG) and the prompt riskva builds (the model's prompt_template as chat messages,
    rendered by the same chat template). vLLM runs with its own defaults instead of the folder's
    generation_config (``--generation-config vllm``), since riskva decodes without the base
    model's repetition penalty; temperature 0 in the request. The servers run one after the
    other, so each has the GPU to itself."""
    import base64
    import io
    import os
    import urllib.request

    from riskva_core.data.image_policy import ImagePolicy
    from riskva_core.data.samples import read_samples
    from riskva_core.evaluate.infer import load_prompt_template

    samples = [s for split in ("test", "val", "train") for s in read_samples(data, split)][:n_images]
    photos = [s.image_file.read_bytes() for s in samples]
    policy, template = ImagePolicy.load(model), load_prompt_template(model)

    def png(data: bytes) -> str:
        buf = io.BytesIO()
        policy.apply(data, "photo").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def ask(bodies):
        def run(url):
            answers = []
            for body in bodies:
                req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as resp:
                    r = json.loads(resp.read())
                answers.append({"text": r["choices"][0]["message"]["content"].strip(),
                                "prompt_tokens": r["usage"]["prompt_tokens"],
                                "completion_tokens": r["usage"]["completion_tokens"]})
            return answers
        return run

    work = out.parent / "vllm_parity"
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RISKVA_HOME": str(work / "home")}
    env.pop("RISKVA_MLFLOW_TRACKING_URI", None)
    subprocess.run([str(bin_dir / "riskva"), "register", "--model_path", str(model), "--example_image",
                    str(samples[0].image_file), "--max_new_tokens", str(max_new_tokens), "--alias", "champion"],
                   env=env, check=True)
    riskva_bodies = [{"model": "riskva", "temperature": 0, "max_tokens": max_new_tokens, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(p).decode()}}]}]} for p in photos]
    port = _free_port()
    riskva = _served([str(bin_dir / "riskva"), "serve", "--api", "openai", "--port", str(port)], env,
                     f"http://127.0.0.1:{port}", work / "riskva_serve.log", ask(riskva_bodies))
    system, user = template.messages(None)
    vllm_bodies = [{"model": "riskva", "temperature": 0, "max_tokens": max_new_tokens, "seed": 0, "messages": [
        {"role": "system", "content": system["content"]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png(p)}},
                                     *[c for c in user["content"] if c["type"] == "text"]]}]} for p in photos]
    port = _free_port()
    vllm_bin = str(bin_dir / "vllm") if (bin_dir / "vllm").exists() else "vllm"
    vllm = _served([vllm_bin, "serve", str(model), "--port", str(port), "--host", "127.0.0.1",
                    "--served-model-name", "riskva", "--dtype", "bfloat16", "--generation-config", "vllm",
                    "--max-model-len", "8192", "--enforce-eager", "--seed", "0"], env,
                   f"http://127.0.0.1:{port}", work / "vllm_serve.log", ask(vllm_bodies))
    equal = [a["text"] == b["text"] for a, b in zip(riskva, vllm)]
    import vllm as vllm_module

    result = {"vllm_version": vllm_module.__version__, "photos": len(photos), "equal": sum(equal),
              "all_equal": all(equal), "max_new_tokens": max_new_tokens,
              "prompt_tokens": {"riskva": [a["prompt_tokens"] for a in riskva],
                                "vllm": [b["prompt_tokens"] for b in vllm]},
              "differences": [{"photo": str(samples[i].image_file), "riskva": riskva[i]["text"],
                               "vllm": vllm[i]["text"]} for i, same in enumerate(equal) if not same]}
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True))
    return all(equal)


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
        "vllm": _json(work / "vllm.json"),
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
    v = sub.add_parser("vllm-parity")
    v.add_argument("model", type=Path)
    v.add_argument("data", type=Path)
    v.add_argument("out", type=Path)
    v.add_argument("--max_new_tokens", type=int, default=64)
    v.add_argument("--n_images", type=int, default=8)
    c = sub.add_parser("collect")
    c.add_argument("work", type=Path)
    c.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "sample-gpu-memory":
        sample_gpu_memory(a.out)
    elif a.cmd == "infer":
        bench_infer(a.model, a.data, a.out, a.max_new_tokens, a.batch_sizes, a.n_images)
    elif a.cmd == "vllm-parity":
        if not vllm_parity(a.model, a.data, a.out, a.max_new_tokens, a.n_images):
            print(f"gpu_check: vLLM's greedy answers differ from riskva serve's (see {a.out})", file=sys.stderr)
            return 1
    else:
        collect(a.work, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
