"""Fixtures of the feedback tests: a real local MLflow store (sqlite) with a few served answers traced.

Imported by the modules that use them: a conftest.py here would shadow tests/conftest.py, which
the other test folders import as ``conftest``."""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from conftest import image_bytes, textured_image
from riskva_core.registry.tracing import FieldTracer, ServedAnswer, TracingConfig

# 2025-03-04 10:00 UTC and the next day: the traces of two "days" in the store.
DAY1_NS = 1_741_082_400 * 10**9
DAY2_NS = DAY1_NS + 86_400 * 10**9


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer(index: int, started_ns: int = DAY1_NS, version: str = "1", parse_ok: bool = True,
           level: str = "中等", confidence: float | None = 0.7) -> ServedAnswer:
    fields = {"风险": "墙面开裂", "风险等级": level, "纠正和预防建议": "建议修补。", "缺陷描述": f"裂缝{index}"}
    if not parse_ok:
        fields = {f: "" for f in fields}
    return ServedAnswer(photo=image_bytes(textured_image(index)), model_name="riskva", model_version=version,
                        alias="champion", started_ns=started_ns + index * 10**9, latency_s=1.25 + index,
                        fields=fields, parse_ok=parse_ok, level_confidence=confidence if parse_ok else None,
                        raw_output="…", api="openai")


@dataclasses.dataclass
class TracedStore:
    tracking_uri: str
    photo_dir: Path
    tracer: FieldTracer
    answers: list[ServedAnswer]


@pytest.fixture(scope="session")
def mlflow_env():
    """Puts back what the tracer changes process-wide (the fluent tracking URI, async export)."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING")}
    yield
    mlflow.set_tracking_uri(None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def traced_store(tmp_path_factory, mlflow_env) -> TracedStore:
    """Five answers on day 1 (two model versions, one parse failure) and two on day 2, traced to sqlite."""
    home = tmp_path_factory.mktemp("traced")
    config = TracingConfig(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", photo_dir=home / "photos",
                           artifact_root=str(home / "artifacts"))
    tracer = FieldTracer(config)
    answers = [answer(0), answer(1, version="2", level="严重", confidence=0.4), answer(2, parse_ok=False),
               answer(3, version="2", confidence=0.9), answer(4, level="轻微", confidence=0.55),
               answer(5, started_ns=DAY2_NS), answer(6, started_ns=DAY2_NS, version="2")]
    for a in answers:
        tracer.record(a)
    assert tracer.flush(120), "the tracer did not write its queue"
    yield TracedStore(config.tracking_uri, home / "photos", tracer, answers)
    tracer.close()
