"""`riskva serve --api openai` keeps its word, tested against the real process on loopback.

One tiny model is registered (batch_size 4, max_new_tokens 32, a body limit of its own) and
served once for the module: hung-up clients leave the queue and are counted cancelled; every
request field is honoured (max_tokens, stop, temperature/top_p/seed, greedy = `riskva infer`)
or refused with a 400 naming it; the body limit is the model's own; the /metrics counters add
up. The last test kills the server's batching worker (from outside: a SIGUSR1 that the test-only
sitecustomize turns into SystemExit raised in the worker thread) and watches /ready turn 503 and
the process exit non-zero.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from model_fixtures import make_prepared_dataset, make_tiny_model
from rank_callbacks import rank_env
from rank_site.sitecustomize import RAISE_ENV
from servers import ServerProcess, free_port

from riskva_core.data.samples import SPLITS, read_samples
from riskva_core.paths import DataRoot
from riskva_core.registry.client import Registry

RISKVA = str(Path(sys.executable).with_name("riskva"))
TOKENS = 32
BATCH = 4
MAX_BODY = 400_000  # the registered model's own max_request_bytes: the only body limit


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RISKVA_"))}
    env.update(RISKVA_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **rank_env(), **{RAISE_ENV: "riskva-batcher"})  # SIGUSR1 kills the batching worker
    return env


def _chat(data: bytes, **fields) -> dict:
    return {"model": "riskva", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}]}],
            **fields}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    ds = make_prepared_dataset(tmp / "ds", n=10)
    model = make_tiny_model(tmp / "tiny", ds)
    home = tmp / "home"
    reg = Registry.under(DataRoot(home))
    images = [s.image_data() for split in SPLITS for s in read_samples(ds, split)]
    paths = [s.image_file for split in SPLITS for s in read_samples(ds, split)]
    rv = reg.log_model(model, example_image=images[0], model_config={
        "max_new_tokens": TOKENS, "batch_size": BATCH, "max_request_bytes": MAX_BODY})
    reg.set_alias("champion", rv.version)
    return {"tmp": tmp, "model": model, "home": home, "images": images, "paths": paths}


def _serve(world, log: Path, *flags: str) -> tuple[ServerProcess, str]:
    port = free_port()
    srv = ServerProcess([RISKVA, "serve", "--api", "openai", "--port", str(port), *flags], env=_env(world["home"]),
                        log=log, name="riskva serve --api openai")
    return srv, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    srv, url = _serve(world, tmp_path_factory.mktemp("contract-log") / "openai.log", "--max_wait_ms", "20")
    with srv:
        srv.wait_http(f"{url}/ready", timeout=300)
        yield url, srv


def _post(url: str, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _metrics(url: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _outcomes(samples: dict[tuple, float]) -> dict[str, float]:
    total: dict[str, float] = {}
    for (name, _), value in samples.items():
        for outcome in ("received", "answered", "failed", "expired", "cancelled", "refused"):
            if name == f"riskva_requests_{outcome}_total":
                total[outcome] = total.get(outcome, 0) + value
    return total


def _hang_up(url: str, body: bytes, after: float) -> None:
    """Send a whole request, wait ``after`` seconds, then close the connection unread."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(after)


def test_hung_up_clients_leave_the_queue_and_are_counted_cancelled(world, server):
    url, _ = server
    image = world["images"][0]
    before = _outcomes(_metrics(url))
    body = json.dumps(_chat(image)).encode()
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda _: _hang_up(url, body, 0.25), range(32)))
    time.sleep(0.2)  # the server notices the last hang-ups
    ahead = _metrics(url)
    assert ahead[("riskva_queue_depth", ())] == 0  # every slot is free again
    t0 = time.perf_counter()
    fresh = _post(url, _chat(world["images"][1]))
    waited = time.perf_counter() - t0
    assert fresh.status_code == 200, fresh.text
    after = _metrics(url)
    # Counted in generate batches, the unit the delay is about: at most the batch that was already
    # generating when the clients hung up, then the fresh request's own. Without cancellation the
    # requests still queued (all but the few answered in the first quarter second) would go first.
    batches = after[("riskva_batch_size_count", ())] - ahead[("riskva_batch_size_count", ())]
    counts = _outcomes(after)
    answered_before_hang_up = counts["answered"] - before.get("answered", 0) - 1
    cancelled = counts["cancelled"] - before.get("cancelled", 0)
    print(f"\n32 clients hung up after 0.25 s: {cancelled:.0f} cancelled, {answered_before_hang_up:.0f} answered "
          f"before; the fresh request waited {waited:.2f} s, {batches:.0f} batches")
    assert batches <= 2, (batches, counts)
    assert cancelled + answered_before_hang_up == 32 and cancelled >= 16, counts


def test_max_tokens_cuts_the_answer_with_finish_reason_length(world, server):
    url, _ = server
    image = world["images"][2]
    full = _post(url, _chat(image)).json()
    assert full["usage"]["completion_tokens"] > 4, full  # so a cap of 4 must cut it
    for field in ("max_tokens", "max_completion_tokens"):
        cut = _post(url, _chat(image, **{field: 4})).json()
        choice = cut["choices"][0]
        assert cut["usage"]["completion_tokens"] <= 4 and choice["finish_reason"] == "length", cut
        assert full["choices"][0]["message"]["content"].startswith(choice["message"]["content"])  # greedy: a prefix
    # A cap above the model's own is honoured as an upper bound: the model's cap applies.
    big = _post(url, _chat(image, max_tokens=100_000)).json()
    assert big["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]
    assert big["usage"]["completion_tokens"] <= TOKENS


def test_stop_ends_the_answer_before_the_stop_string(world, server):
    url, _ = server
    image = world["images"][3]
    text = _post(url, _chat(image)).json()["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    got = _post(url, _chat(image, stop=[stop, "never-in-the-answer"])).json()
    assert got["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"


def test_greedy_equals_riskva_infer_and_seeded_sampling_is_reproducible(world, server):
    url, _ = server
    image, path = world["images"][4], world["paths"][4]
    out = world["tmp"] / "infer.json"
    proc = subprocess.run([RISKVA, "infer", "--model_path", str(world["model"]), "--image_path", str(path),
                           "--output_file", str(out), "--max_new_tokens", str(TOKENS), "--no_progress"],
                          env=_env(world["home"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    infer_text = json.loads(out.read_text(encoding="utf-8"))[0]["raw_output"]
    greedy = _post(url, _chat(image)).json()["choices"][0]["message"]["content"]
    assert greedy == infer_text
    assert _post(url, _chat(image, temperature=0, seed=5)).json()["choices"][0]["message"]["content"] == greedy

    def sample(seed: int, **more) -> str:
        return _post(url, _chat(image, temperature=1.0, top_p=0.95, seed=seed, **more)).json()[
            "choices"][0]["message"]["content"]

    first = sample(7)
    # The same seed gives the same answer, also when it arrives among other requests (it is generated alone).
    with ThreadPoolExecutor(max_workers=4) as pool:
        crowd = [pool.submit(_post, url, _chat(world["images"][i])) for i in range(3)]
        again = pool.submit(sample, 7)
        assert all(f.result().status_code == 200 for f in crowd)
    assert again.result() == first
    # ... and sampling does happen: other seeds give other answers than greedy decoding.
    assert {sample(seed) for seed in (1, 2, 3)} | {first} != {greedy}


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("logprobs", True), ("top_logprobs", 3),
    ("response_format", {"type": "json_object"}), ("n", 2), ("stream", True), ("frequency_penalty", 0.5),
    ("logit_bias", {"50256": -100}), ("functions", [{"name": "f"}]), ("store", True), ("audio", {"voice": "x"}),
    ("max_token", 4), ("temperature", 3), ("top_p", 0), ("max_tokens", 0), ("seed", "7"), ("stop", 5),
])
def test_a_field_the_server_cannot_honour_is_a_400_naming_it(world, server, field, value):
    url, _ = server
    resp = _post(url, _chat(world["images"][0], **{field: value}))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and f"'{field}'" in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_harmless_fields_are_accepted_and_another_model_name_is_a_404(world, server):
    url, _ = server
    ok = _post(url, _chat(world["images"][0], user="inspector-7", metadata={"site": "A"}, n=1, stream=False,
                          logprobs=False, response_format={"type": "text"}, tool_choice="none", store=False))
    assert ok.status_code == 200 and ok.json()["model"] == "riskva", ok.text
    other = _post(url, {**_chat(world["images"][0]), "model": "gpt-4o"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"


def test_the_body_limit_is_the_registered_models_own(world, server):
    url, _ = server
    resp = _post(url, _chat(b"\xff" * MAX_BODY))
    assert resp.status_code == 413 and "(max_request_bytes)" in resp.json()["error"]["message"], resp.text
    assert _post(url, _chat(world["images"][0])).status_code == 200


def test_the_metrics_counters_add_up(world, server):
    url, _ = server
    _post(url, _chat(world["images"][0], max_token=1))  # refused: invalid
    _post(url, _chat(b"\xff" * MAX_BODY))  # refused: too large
    samples = _metrics(url)
    counts = _outcomes(samples)
    assert counts["received"] == sum(counts[o] for o in ("answered", "failed", "expired", "cancelled", "refused"))
    assert counts["answered"] > 0 and counts["refused"] > 0 and counts["cancelled"] >= 1  # some of the 32 hang-ups were answered first
    assert samples[("riskva_requests_refused_total", (("reason", "too_large"),))] >= 1
    assert samples[("riskva_images_total", ())] == counts["answered"]


def test_a_dead_worker_makes_ready_503_and_the_process_exit_non_zero(world, server):
    """Last in the module: it ends the module's server (one model load fewer than a server of its own)."""
    url, srv = server
    assert _post(url, _chat(world["images"][0])).status_code == 200
    # SystemExit raised inside the worker thread of the running server, as a fatal error would.
    srv.proc.send_signal(signal.SIGUSR1)
    statuses = []
    deadline = time.monotonic() + 30
    while srv.alive() and time.monotonic() < deadline:
        try:
            statuses.append(requests.get(f"{url}/ready", timeout=2).status_code)
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    srv.proc.wait(timeout=60)
    assert 503 in statuses, (statuses, srv.tail())
    assert srv.proc.returncode not in (0, None), srv.fail_message("exited 0 after its worker died")
    assert "the batching worker died (SystemExit" in srv.tail(20000)
