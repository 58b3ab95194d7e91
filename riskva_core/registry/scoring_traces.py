"""Tracing for MLflow's scoring server (``riskva serve --api mlflow``): an ASGI middleware in front of
the body limit.

MLflow's app is its own (scoring_app.py), so the answers are read where they pass: the middleware
keeps the chunks of a ``POST /invocations`` body as the app reads them and the chunks of its
response as they are sent; once the response has gone out, a worker thread (never the event loop)
decodes both and queues one trace per photo row with the tracer (tracing.py), which writes them on
its own thread. A body or an answer it cannot read is logged and skipped: the client already has
its answer. ``GET /metrics`` answers the trace-gap counter (``riskva_trace_gaps_total{reason}``),
the one metric this server adds to MLflow's.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from typing import Any, Awaitable, Callable

from riskva_core.registry.tracing import FieldTracer, record_row
from riskva_core.schema import INPUT_COLUMN

log = logging.getLogger(__name__)


def request_images(body: bytes) -> list[bytes | None]:
    """The photos of an ``/invocations`` body, one per row (None where a row's image is not base64).
    MLflow's JSON formats: ``dataframe_split``, ``dataframe_records``, ``inputs``/``instances``."""
    payload = json.loads(body)
    values: list[Any] = []
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        column = list(split.get("columns") or [INPUT_COLUMN]).index(INPUT_COLUMN)
        values = [row[column] for row in split.get("data") or []]
    elif "dataframe_records" in payload:
        values = [row.get(INPUT_COLUMN) for row in payload["dataframe_records"]]
    else:
        rows = payload.get("inputs", payload.get("instances"))
        if isinstance(rows, dict):
            values = list(rows.get(INPUT_COLUMN) or [])
        elif isinstance(rows, list):
            values = [r.get(INPUT_COLUMN) if isinstance(r, dict) else r for r in rows]
    out: list[bytes | None] = []
    for value in values:
        try:
            text = value.split(",", 1)[1] if isinstance(value, str) and value.startswith("data:") else value
            out.append(base64.b64decode(text, validate=True) if isinstance(text, str) else None)
        except (binascii.Error, ValueError):
            out.append(None)
    return out


def response_rows(body: bytes) -> list[dict[str, Any]]:
    """The output rows of MLflow's answer (``{"predictions": [...]}``)."""
    rows = json.loads(body).get("predictions")
    if isinstance(rows, dict):  # column-oriented
        columns = list(rows)
        return [dict(zip(columns, values)) for values in zip(*(rows[c] for c in columns))]
    return [r for r in rows or [] if isinstance(r, dict)]


def trace_exchange(tracer: FieldTracer, identity: tuple, request: bytes, response: bytes, started_ns: int,
                   latency_s: float) -> None:
    """One trace per answered photo row of one request (skips rows without an answer or a photo)."""
    try:
        images, rows = request_images(request), response_rows(response)
    except Exception as exc:  # noqa: BLE001 - not a body we can read: nothing to trace
        log.warning("an /invocations exchange was not traced (%s: %s)", type(exc).__name__, exc)
        return
    for image, row in zip(images, rows):
        if image is not None and not row.get("error"):
            record_row(tracer, row, image, identity, started_ns, latency_s, "mlflow")


class TraceInvocations:
    """ASGI middleware: traces ``POST /invocations`` after its answer is sent; serves ``GET /metrics``."""

    def __init__(self, app: Any, tracer: FieldTracer | None, identity: tuple, metrics: Callable[[], tuple[bytes, str]]):
        self.app, self.tracer, self.identity, self.metrics = app, tracer, identity, metrics

    def __getattr__(self, name: str) -> Any:  # app.state, the body limit's max_bytes… stay reachable
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            data, content_type = self.metrics()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type.encode())]})
            return await send({"type": "http.response.body", "body": data})
        if self.tracer is None or scope["method"] != "POST" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        started_ns, start = time.time_ns(), time.monotonic()
        body: list[bytes] = []
        answer: list[bytes] = []
        status = [0]

        async def keep_body() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
            return message

        async def keep_answer(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        await self.app(scope, keep_body, keep_answer)
        if status[0] == 200:
            threading.Thread(target=trace_exchange, name="riskva-trace-decode", daemon=True,
                             args=(self.tracer, self.identity, b"".join(body), b"".join(answer), started_ns,
                                   time.monotonic() - start)).start()

    async def _lifespan(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def on_shutdown(message: dict) -> None:
            if message["type"].startswith("lifespan.shutdown") and self.tracer is not None:
                self.tracer.close(5)
            await send(message)

        await self.app(scope, receive, on_shutdown)
