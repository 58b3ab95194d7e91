from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

import mlflow

from feedback_fixtures import DAY1_NS, answer, closed_port, mlflow_env, traced_store  # noqa: F401 (fixtures)
from riskva_core.registry.tracing import (TAG_SOURCE, TAG_VERSION, FieldTracer, ServedAnswer, TracingConfig,
                                          find_photo, photo_extension, store_photo)


def test_a_down_store_costs_the_request_nothing_and_counts_a_gap(tmp_path):
    seen: list[str] = []
    config = TracingConfig(tracking_uri=f"http://127.0.0.1:{closed_port()}", photo_dir=tmp_path / "photos",
                           probe_timeout_s=1.0, retry_after_s=60.0)
    tracer = FieldTracer(config, on_gap=seen.append)
    try:
        started = time.monotonic()
        tracer.record(answer(0))
        tracer.record(answer(1))
        assert time.monotonic() - started < 0.25  # the request thread only queues (a loaded 2-core box: margin)
        assert tracer.flush(10)
        assert tracer.gaps()["store_down"] == 2 and seen == ["store_down", "store_down"]
        assert tracer.written == 0
        # the photo is kept even when the store is down: the trace is lost, the field photo is not
        sha = hashlib.sha256(answer(0).photo).hexdigest()
        assert find_photo(tmp_path / "photos", sha).read_bytes() == answer(0).photo
    finally:
        tracer.close(5)


class _SlowHealth(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        time.sleep(0.5)  # keeps the writer busy while the requests keep coming
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_writer_that_falls_behind_drops_traces_instead_of_waiting(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tracer = FieldTracer(TracingConfig(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}",
                                       photo_dir=None, queue_size=1, probe_timeout_s=5.0))
    try:
        started = time.monotonic()
        for i in range(5):
            tracer.record(answer(i))
        assert time.monotonic() - started < 0.2
        assert tracer.flush(15)
        gaps = tracer.gaps()
        assert gaps["queue_full"] >= 3 and gaps["store_down"] >= 1
        assert gaps["queue_full"] + gaps["store_down"] == 5
    finally:
        tracer.close(5)
        server.shutdown()


def test_traces_reach_a_real_store_and_are_found_by_tag(traced_store):
    tracer = traced_store.tracer
    assert tracer.written == len(traced_store.answers) and sum(tracer.gaps().values()) == 0
    experiment = mlflow.MlflowClient(traced_store.tracking_uri).get_experiment_by_name("riskva-field")
    traces = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list",
                                  filter_string=f"tags.`{TAG_SOURCE}` = 'serve' AND tags.`{TAG_VERSION}` = '2'")
    assert len(traces) == 3
    by_photo = {t.info.tags["riskva.photo_sha256"]: t for t in traces}
    first = answer(1, version="2", level="严重", confidence=0.4)
    trace = by_photo[hashlib.sha256(first.photo).hexdigest()]
    # the trace is the request's own time and latency, not the writer's
    assert trace.info.timestamp_ms == first.started_ns // 10**6
    assert trace.info.execution_duration == round(first.latency_s * 1000)
    span = trace.data.spans[0]
    assert span.outputs["风险等级"] == "严重" and span.outputs["parse_ok"] is True
    assert abs(span.outputs["level_confidence"] - 0.4) < 1e-9
    assert span.inputs["photo_stored"] is True and "photo" not in span.inputs  # the photo is never in the trace
    assert trace.info.tags["riskva.model_alias"] == "champion" and trace.info.tags["riskva.level"] == "严重"


def test_photo_retention_off_keeps_only_the_hash(tmp_path, mlflow_env):
    config = TracingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", photo_dir=None,
                           artifact_root=str(tmp_path / "artifacts"))
    tracer = FieldTracer(config)
    try:
        tracer.record(answer(0))
        assert tracer.flush(120) and tracer.written == 1
    finally:
        tracer.close(5)
    assert not list(tmp_path.rglob("*.jpg"))
    experiment = mlflow.MlflowClient(config.tracking_uri).get_experiment_by_name("riskva-field")
    (trace,) = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
    assert trace.data.spans[0].inputs["photo_stored"] is False
    assert trace.info.tags["riskva.photo_sha256"] == hashlib.sha256(answer(0).photo).hexdigest()


def test_a_photo_is_stored_once_under_its_hash(tmp_path):
    data = answer(3).photo
    first = store_photo(tmp_path, data)
    mtime = first.stat().st_mtime_ns
    assert store_photo(tmp_path, data) == first and first.stat().st_mtime_ns == mtime
    assert first.name == hashlib.sha256(data).hexdigest() + ".jpg" and photo_extension(b"\x89PNG....") == "png"
    assert find_photo(tmp_path, "0" * 64) is None


def test_config_from_env_honours_the_switches(tmp_path, monkeypatch):
    from riskva_core.paths import DataRoot

    root = DataRoot(tmp_path)
    monkeypatch.delenv("RISKVA_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TracingConfig.from_env(root)
    assert config.photo_dir == root.field_photos and config.tracking_uri == root.mlflow_tracking_uri
    monkeypatch.setenv("RISKVA_RETAIN_FIELD_PHOTOS", "0")
    assert TracingConfig.from_env(root).photo_dir is None
    monkeypatch.setenv("RISKVA_TRACE_REQUESTS", "off")
    assert TracingConfig.from_env(root) is None


class _FailingStore(http.server.BaseHTTPRequestHandler):
    """A tracking server that is up (health, experiment) but fails to take the trace itself."""

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/health"):
            code, body = 200, b"OK"
        elif "experiments/get-by-name" in self.path:
            code, body = 200, json.dumps({"experiment": {"experiment_id": "1", "name": "riskva-field",
                                                         "lifecycle_stage": "active"}}).encode()
        else:
            code, body = 500, b'{"error_code": "INTERNAL_ERROR", "message": "disk full"}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args):
        pass


def test_an_export_mlflow_swallows_is_still_counted(monkeypatch, mlflow_env):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's back-off would take minutes
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tracer = FieldTracer(TracingConfig(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        tracer.record(answer(0))
        assert tracer.flush(60)
        assert tracer.gaps()["export_failed"] == 1 and tracer.written == 0
    finally:
        tracer.close(5)
        server.shutdown()


def test_a_served_row_becomes_an_answer():
    row = {"风险": "钢筋外露", "风险等级": "严重", "纠正和预防建议": "除锈", "缺陷描述": "柱脚", "raw_output": "…",
           "parse_ok": True, "error": "", "level_confidence": float("nan")}
    got = ServedAnswer.from_row(row, b"jpeg", model_name="riskva", model_version=3, alias="champion",
                                started_ns=5, latency_s=0.5, api="mlflow")
    assert got.fields["风险等级"] == "严重" and got.level_confidence is None and got.model_version == "3"
    assert ServedAnswer.from_row({**row, "level_confidence": 0.8}, b"", model_name="m", model_version="1", alias=None,
                                 started_ns=0, latency_s=0, api="openai").level_confidence == 0.8
