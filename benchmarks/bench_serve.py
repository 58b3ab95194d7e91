"""Serving throughput: batched requests against one image per request, concurrency, and a load test.

    .venv/bin/python benchmarks/bench_serve.py [--n_images 48] [--batch_size 8] [--size small]
        [--max_new_tokens 32] [--load_requests 200] [--load_clients 20] [--home riskva_home]

Builds the demo's tiny model on a small prepared dataset, registers it in a temporary MLflow
registry (model_config: ``batch_size``, ``max_new_tokens``) and starts both servers as a user
would: ``riskva serve`` (MLflow's /invocations) and ``riskva serve --api openai``.
With ``--home riskva_home`` (after ``make demo``) it serves that registry's ``@champion`` instead,
as registered (its own batch size and answer length), on photos of the demo's prepared dataset:
a trained model writing whole answers, which is what the acceptance of issue 20 names.

1. Throughput, same images, same server, in one run: ``n_images`` requests of one row each,
   sent one after another, against ``n_images / batch_size`` requests of ``batch_size`` rows
   (the pyfunc generates each request's rows as one left-padded batch). Each is warmed up once;
   the answers must be identical (greedy decoding; left padding changes nothing).
2. Concurrency (OpenAI-compatible server, one photo per request): the same ``n_images`` photos
   sent one after another, then from ``n_images`` concurrent clients, which the server batches
   (up to ``batch_size`` per generate batch). Reports the gain (sequential time / concurrent
   time), checks the answers are identical and measures ``/health`` all through the burst.
3. Load: ``load_requests`` chat completions from ``load_clients`` concurrent clients against the
   OpenAI-compatible server, one in four corrupt; reports p50/p95 latency and the error rate,
   checks that every valid request got a 200 and that the server still answers afterwards.
"""
from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RISKVA = str(Path(sys.executable).with_name("riskva"))


def _post_rows(url: str, images: list[bytes]) -> list[str]:
    import requests

    from riskva_core.registry.serve import request_payload

    resp = requests.post(f"{url}/invocations", json=request_payload(images), timeout=600)
    resp.raise_for_status()
    return [p["raw_output"] for p in resp.json()["predictions"]]


def throughput(url: str, images: list[bytes], batch_size: int) -> dict[str, float]:
    _post_rows(url, images[:1])
    _post_rows(url, images[:batch_size])  # warm-up of both shapes
    t0 = time.perf_counter()
    single = [out for img in images for out in _post_rows(url, [img])]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = [out for s in range(0, len(images), batch_size) for out in _post_rows(url, images[s:s + batch_size])]
    t_batched = time.perf_counter() - t0
    if single != batched:
        raise SystemExit("batched answers differ from one-by-one answers")
    return {"single_img_s": len(images) / t_single, "batched_img_s": len(images) / t_batched,
            "ratio": t_single / t_batched}


def chat(data: bytes) -> dict:
    return {"model": "riskva", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}]}]}


def concurrency(url: str, images: list[bytes]) -> dict[str, float]:
    """The same photos sequentially, then from one client each at once; /health probed throughout."""
    import requests

    def answer(data: bytes) -> str:
        resp = requests.post(f"{url}/v1/chat/completions", json=chat(data), timeout=600)
        resp.raise_for_status()
        return resp.json()["choices"][0]["message"]["content"]

    answer(images[0])  # warm-up
    t0 = time.perf_counter()
    sequential = [answer(img) for img in images]
    t_seq = time.perf_counter() - t0
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            requests.get(f"{url}/health", timeout=60).raise_for_status()
            health.append(time.perf_counter() - start)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        together = list(pool.map(answer, images))
    t_conc = time.perf_counter() - t0
    done.set()
    prober.join()
    if sequential != together:
        raise SystemExit("concurrent answers differ from sequential answers")
    return {"sequential_s": t_seq, "concurrent_s": t_conc, "gain": t_seq / t_conc,
            "health_max_s": max(health), "health_probes": len(health)}


def load(url: str, images: list[bytes], n_requests: int, clients: int) -> dict[str, float]:
    import requests

    corrupt = [chat(b"corrupt" * 20), chat(images[0][:300])]
    jobs = [(chat(images[i % len(images)]), True) if i % 4 else (corrupt[i % 2], False) for i in range(n_requests)]

    def send(job):
        body, valid = job
        t0 = time.perf_counter()
        status = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600).status_code
        return valid, status, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(send, jobs))
    wall = time.perf_counter() - t0
    lat = sorted(t for _, _, t in results)
    failed_valid = sum(1 for valid, status, _ in results if valid and status != 200)
    if failed_valid or any(status != 400 for valid, status, _ in results if not valid):
        raise SystemExit(f"load: {failed_valid} valid requests failed or a corrupt one was not a 400")
    if requests.post(f"{url}/v1/chat/completions", json=chat(images[0]), timeout=600).status_code != 200:
        raise SystemExit("load: the server no longer answers")
    return {"p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[max(0, int(0.95 * len(lat)) - 1)],
            "error_rate": sum(1 for _, s, _ in results if s != 200) / len(results), "req_s": len(results) / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_images", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--size", choices=["tiny", "small"], default="small", help="tiny_model size (default small)")
    p.add_argument("--load_requests", type=int, default=200)
    p.add_argument("--load_clients", type=int, default=20)
    p.add_argument("--home", type=Path, default=None,
                   help="serve this RISKVA_HOME's registered champion (e.g. after `make demo`) instead of "
                        "building an untrained model; --size and --max_new_tokens then do not apply "
                        "(--batch_size stays the rows per request of the throughput part)")
    p.add_argument("--alias", default="champion", help="with --home: the alias to serve (default champion)")
    args = p.parse_args()

    from model_fixtures import make_prepared_dataset, make_tiny_model
    from servers import ServerProcess, free_port

    from riskva_core.data.samples import SPLITS, read_samples
    from riskva_core.paths import DataRoot
    from riskva_core.registry.client import Registry

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        if args.home is None:
            home = DataRoot(root / "home")
            ds = make_prepared_dataset(root / "ds", n=max(args.n_images, 10), image_size=96)
            model = make_tiny_model(root / "model", ds, size=args.size)
            reg = Registry.under(home)
            images = [s.image_data() for split in SPLITS for s in read_samples(ds, split)][: args.n_images]
            rv = reg.log_model(model, example_image=images[0], model_config={
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size})
            reg.set_alias(args.alias, rv.version)
            served = f"a {args.size} model with random weights"
        else:
            home = DataRoot(args.home)
            version = home.newest_dataset_version()
            ds = home.prepared_dir(version, "jsonl") if version else None
            if ds is None or not ds.is_dir():
                raise SystemExit(f"--home {args.home}: no prepared dataset (run `make demo` first)")
            reg = Registry.under(home)
            number = reg.alias_version(args.alias)
            if number is None:
                raise SystemExit(f"--home {args.home}: no model version has the alias @{args.alias}")
            # The photos the champion was not trained on first, then as many more as asked for.
            images = [s.image_data() for split in reversed(SPLITS) for s in read_samples(ds, split)][: args.n_images]
            served = f"{args.home}'s @{args.alias} (version {number}, dataset {version}), as registered"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RISKVA_"))}
        env.update(RISKVA_HOME=str(home.root), TOKENIZERS_PARALLELISM="false")
        model_flags = ["--model_uri", f"models:/riskva@{args.alias}"]
        ports = free_port(), free_port()
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        with ServerProcess([RISKVA, "serve", *model_flags, "--port", str(ports[0])], env=env,
                           log=root / "mlflow.log") as srv:
            srv.wait_http(f"{urls[0]}/ping", timeout=600)
            tp = throughput(urls[0], images, args.batch_size)
        with ServerProcess([RISKVA, "serve", *model_flags, "--api", "openai", "--port", str(ports[1])], env=env,
                           log=root / "openai.log") as srv:
            srv.wait_http(f"{urls[1]}/ready", timeout=600)
            cc = concurrency(urls[1], images)
            ld = load(urls[1], images, args.load_requests, args.load_clients)
    print(f"served {served}, {len(images)} images, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"throughput (MLflow server): one image per request {tp['single_img_s']:.2f} img/s, "
          f"{args.batch_size} rows per request {tp['batched_img_s']:.2f} img/s, ratio {tp['ratio']:.2f}x")
    print(f"concurrency (OpenAI server): {args.n_images} photos one after another {cc['sequential_s']:.2f} s, "
          f"from {args.n_images} concurrent clients {cc['concurrent_s']:.2f} s, gain {cc['gain']:.2f}x, identical "
          f"answers; /health max {1000 * cc['health_max_s']:.0f} ms over {cc['health_probes']} probes")
    print(f"load (OpenAI server): {args.load_requests} requests from {args.load_clients} clients, 1 in 4 corrupt: "
          f"p50 {ld['p50_ms']:.0f} ms, p95 {ld['p95_ms']:.0f} ms, error rate {ld['error_rate']:.2f} "
          f"(all corrupt ones), {ld['req_s']:.1f} req/s; every valid request answered, server still up")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
