"""Both servers trace what they answer (tracing.py), and a tracking store that is down never fails a
request: the answer goes out and the lost trace is counted in ``/metrics``.

Cheap on purpose: the OpenAI app serves a stand-in pyfunc (a DataFrame per batch, no model), and
the MLflow side is the tracing middleware around a stand-in scoring app; the real apps under load
are tests/registry/test_serve_load.py's, the real tracer's store tests tests/feedback/test_tracing.py's.
"""
from __future__ import annotations

import base64
import json
import time

import pandas as pd
import requests
from servers import ThreadServer

from conftest import image_bytes, textured_image
from riskva_core.registry import openai_api
from riskva_core.registry.scoring_traces import TraceInvocations, request_images
from riskva_core.registry.serve import request_payload
from riskva_core.registry.tracing import FieldTracer, TracingConfig, gap_counter, model_identity
from riskva_core.schema import FIELDS

ROW = {"风险": "墙面开裂", "风险等级": "中等", "纠正和预防建议": "建议修补。", "缺陷描述": "裂缝", "raw_output": "…",
       "parse_ok": True, "error": "", "prompt_tokens": 10, "completion_tokens": 5, "finish_reason": "stop",
       "level_confidence": 0.8}


class StandIn:
    """What the OpenAI app needs of a pyfunc: ``predict`` on a table of images."""

    def predict(self, frame, params=None):
        return pd.DataFrame([ROW] * len(frame))


def _down(tmp_path) -> TracingConfig:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return TracingConfig(tracking_uri=f"http://127.0.0.1:{port}", photo_dir=tmp_path / "photos",
                         probe_timeout_s=0.2, retry_after_s=60)


def _gaps(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=5).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) if f.name == "riskva_trace_gaps"
            for s in f.samples if s.name.endswith("_total")}


def _wait_gaps(url: str, reason: str, count: int) -> dict[str, float]:
    deadline = time.monotonic() + 20
    while (gaps := _gaps(url)).get(reason, 0) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return gaps


def test_openai_server_answers_while_the_store_is_down_and_counts_the_gaps(tmp_path):
    photo = image_bytes(textured_image(1))
    body = {"model": "riskva", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(photo).decode()}}]}]}
    app = openai_api.create_app(lambda: StandIn(), "riskva", tracing=_down(tmp_path),
                                identity=("riskva", "3", "champion"))
    with ThreadServer(app) as srv:
        srv.wait_ready()
        assert set(_gaps(srv.url)) >= {"queue_full", "store_down", "export_failed", "photo_not_stored"}
        for _ in range(3):
            reply = requests.post(f"{srv.url}/v1/chat/completions", json=body, timeout=30)
            assert reply.status_code == 200 and reply.json()["riskva"]["parsed"]["风险等级"] == "中等"
        gaps = _wait_gaps(srv.url, "store_down", 3)
    assert gaps["store_down"] == 3 and gaps["export_failed"] == 0, gaps
    assert len(list((tmp_path / "photos").rglob("*.jpg"))) == 1  # kept once, by hash, even with the store down


def test_mlflow_server_traces_each_photo_row_after_the_answer(tmp_path):
    photos = [image_bytes(textured_image(i)) for i in range(2)]
    seen: list[bytes] = []

    async def scoring(scope, receive, send):  # MLflow's app, as far as the middleware can tell
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        request = b""
        while (message := await receive())["type"] == "http.request":
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(request)
        rows = [ROW] * len(json.loads(request)["dataframe_split"]["data"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"predictions": rows}).encode()})

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    counter = gap_counter(registry)
    tracer = FieldTracer(_down(tmp_path), on_gap=lambda r: counter.labels(reason=r).inc())
    app = TraceInvocations(scoring, tracer, ("riskva", "3", "champion"),
                           lambda: (generate_latest(registry), CONTENT_TYPE_LATEST))
    with ThreadServer(app) as srv:
        reply = requests.post(f"{srv.url}/invocations", json=request_payload(photos), timeout=30)
        assert reply.status_code == 200 and len(reply.json()["predictions"]) == 2
        gaps = _wait_gaps(srv.url, "store_down", 2)
    assert gaps["store_down"] == 2, gaps
    assert request_images(seen[0]) == photos  # the app read the body the client sent, untouched
    assert len(list((tmp_path / "photos").rglob("*.jpg"))) == 2


def test_the_served_version_is_resolved_once_from_the_uri():
    assert model_identity("models:/riskva/7") == ("riskva", "7", None)
    assert model_identity("models:/riskva@champion", "4") == ("riskva", "4", "champion")
    assert model_identity("/some/artifacts") == ("riskva", "unknown", None)
    assert set(FIELDS) <= set(ROW)
