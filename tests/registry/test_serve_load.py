"""Serving under load: batching, backpressure, deadlines, out-of-memory, body limits, metrics.

One tiny model is registered (batch_size 4) and loaded once; each test serves it through the
real apps (the OpenAI-compatible one and MLflow's scoring app behind the body limit) under a
real uvicorn on loopback, in a thread of this process so that an out-of-memory error can be
planted in the loaded model (there is no GPU to run out of).
"""
from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from model_fixtures import make_prepared_dataset, make_tiny_model
from servers import ThreadServer

from riskva_core.data.samples import SPLITS, read_samples
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.predict import predict_split
from riskva_core.paths import DataRoot
from riskva_core.registry import openai_api, scoring_app
from riskva_core.registry.client import Registry

TOKENS = 12
BATCH = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import mlflow

    tmp = tmp_path_factory.mktemp("load")
    ds = make_prepared_dataset(tmp / "ds", n=12)
    model_dir = make_tiny_model(tmp / "tiny", ds)
    reg = Registry.under(DataRoot(tmp / "home"))
    images = [s.image_data() for split in SPLITS for s in read_samples(ds, split)]
    rv = reg.log_model(model_dir, example_image=images[0], model_config={"max_new_tokens": TOKENS, "batch_size": BATCH})
    reg.activate()
    model = mlflow.pyfunc.load_model(rv.model_uri)
    return {"ds": ds, "reg": reg, "rv": rv, "images": images, "model": model}


def _chat(data: bytes) -> dict:
    return {"model": "riskva", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}]}]}


def _openai(world, **kwargs) -> ThreadServer:
    return ThreadServer(openai_api.create_app(lambda: world["model"], "riskva", **kwargs))


def _post(url: str, data: bytes) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json=_chat(data), timeout=120)


def test_concurrent_requests_share_batches_answer_as_alone_and_health_stays_instant(world):
    from prometheus_client.parser import text_string_to_metric_families

    images = world["images"][:8]
    with _openai(world, max_wait_ms=20) as srv:
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200
        srv.wait_ready()
        alone = [_post(srv.url, img).json() for img in images]
        health: list[float] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                assert requests.get(f"{srv.url}/health", timeout=10).status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            together = [r.json() for r in pool.map(lambda img: _post(srv.url, img), images)]
        done.set()
        prober.join()
        metrics = requests.get(f"{srv.url}/metrics", timeout=10).text
    assert [a["choices"][0]["message"]["content"] for a in alone] == \
        [t["choices"][0]["message"]["content"] for t in together]
    for answer in together:
        usage = answer["usage"]
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= TOKENS
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert health and max(health) < 2.0, health
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert {"riskva_requests", "riskva_request_latency_seconds", "riskva_batch_size", "riskva_queue_depth",
            "riskva_images", "riskva_images_per_second", "riskva_ready"} <= set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("riskva_requests_total", (("status", "200"),))] == 16
    assert samples[("riskva_images_total", ())] == 16
    batches = samples[("riskva_batch_size_count", ())]
    assert batches < 16 and samples[("riskva_batch_size_sum", ())] == 16  # some requests shared a batch
    assert samples[("riskva_ready", ())] == 1.0


def test_full_queue_is_503_with_retry_after_and_expired_deadline_is_504(world):
    images = world["images"]
    with _openai(world, max_queue=1, max_wait_ms=0) as srv:
        srv.wait_ready()
        with ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(lambda i: _post(srv.url, images[i % len(images)]), range(12)))
        busy = [r for r in responses if r.status_code == 503]
        assert busy and all(r.status_code == 200 for r in responses if r not in busy)
        for r in busy:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_busy" and r.json()["error"]["type"] == "server_error"
    with _openai(world, timeout_s=0.001) as srv:
        srv.wait_ready()
        late = _post(srv.url, images[0])
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"


def test_out_of_memory_is_a_retryable_503_and_stops_evaluation(world, monkeypatch):
    import torch

    generator = world["model"].unwrap_python_model()._generator
    real = generator.generate
    calls = {"n": 0}

    def once_out_of_memory(images):  # what a GPU does when a batch does not fit (none here)
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images)

    monkeypatch.setattr(generator, "generate", once_out_of_memory)
    with _openai(world) as srv:
        srv.wait_ready()
        refused = _post(srv.url, world["images"][0])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "out_of_memory" and int(refused.headers["Retry-After"]) >= 1
        again = _post(srv.url, world["images"][0])  # the retry is answered: the server kept serving
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
    # Evaluation: an infrastructure error that stops the run, not unparsed answers.
    from riskva_core.evaluate import infer

    def always_out_of_memory(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(infer.Generator, "generate", always_out_of_memory)
    world["reg"].activate()
    with pytest.raises(RiskvaError, match="infrastructure error, evaluation stopped and nothing scored"):
        predict_split(world["rv"].model_uri, world["ds"], "test")


def _raw_post(url: str, path: str, headers: dict[str, str], body_chunks, chunked: bool) -> tuple[int, int, float]:
    """POST over a raw socket; stop sending once the server answers. (status, bytes sent, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", *[
        f"{k}: {v}" for k, v in headers.items()]]
    if chunked:
        head.append("Transfer-Encoding: chunked")
    sock = socket.create_connection((host, int(port)), timeout=30)
    t0 = time.perf_counter()
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.setblocking(False)
        reply = b""
        for chunk in body_chunks:
            try:
                reply += sock.recv(65536)
            except BlockingIOError:
                pass
            if reply:
                break
            data = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
            try:
                sock.setblocking(True)
                sock.sendall(data)
                sent += len(chunk)
            except OSError:  # the server closed the connection after answering
                break
            finally:
                sock.setblocking(False)
        sock.setblocking(True)
        while b"\r\n" not in reply:
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    finally:
        sock.close()
    return int(reply.split(b" ", 2)[1]), sent, time.perf_counter() - t0


@pytest.mark.parametrize("server", ["openai", "mlflow"])
def test_an_80_mb_body_is_refused_with_413_before_it_is_read(world, server, monkeypatch):
    # MLflow's app marks the process as a serving environment; this process is the test runner.
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")
    total = 80 * 1024 * 1024
    megabyte = b"A" * (1024 * 1024)
    if server == "openai":
        app, path = openai_api.create_app(lambda: world["model"], "riskva"), "/v1/chat/completions"
    else:
        app, path = scoring_app.create_app(world["model"]), "/invocations"
    with ThreadServer(app) as srv:
        status, sent, seconds = _raw_post(srv.url, path, {"Content-Length": str(total)}, [megabyte] * 80, False)
        assert status == 413 and sent < total and seconds < 5, (status, sent, seconds)
        # Without a length (chunked), the body is counted as it arrives: refused soon after the cap.
        status, sent, seconds = _raw_post(srv.url, path, {}, [megabyte] * 80, True)
        assert status == 413 and sent < total and seconds < 10, (status, sent, seconds)
        if server == "mlflow":  # a request within the limit still reaches MLflow's app
            from riskva_core.registry.serve import request_payload

            ok = requests.post(f"{srv.url}{path}", json=request_payload(world["images"][:1]), timeout=120)
            assert ok.status_code == 200 and ok.json()["predictions"][0]["raw_output"]
