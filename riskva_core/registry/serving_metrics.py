"""Prometheus metrics of the OpenAI-compatible server (``GET /metrics``, prometheus-client).

Every chat-completion request is counted once when it arrives and once when it ends, by how
it ended, so that ``received = answered + failed + expired + cancelled + refused`` (plus the
requests in flight):

- ``riskva_requests_received_total``;
- ``riskva_requests_answered_total``: a 200 with the model's answer;
- ``riskva_requests_failed_total{reason}``: the server could not answer: ``out_of_memory``
  (503, retryable), ``worker_died`` (503, the process is going down) or ``error`` (500);
- ``riskva_requests_expired_total``: no answer within ``--timeout`` (504);
- ``riskva_requests_cancelled_total``: the client hung up before its answer; it left the queue,
  or its answer was dropped if its batch was already generating;
- ``riskva_requests_refused_total{reason}``: refused before reaching the model:
  ``invalid_request`` (400/404), ``too_large`` (413), ``server_busy`` or ``model_loading`` (503);
- ``riskva_requests_total{status}``: the same requests by HTTP status (499, nginx's "client
  closed request", for cancelled ones);
- ``riskva_request_latency_seconds``: request latency (histogram);
- ``riskva_batch_size``: requests per generate batch (histogram);
- ``riskva_queue_depth``: requests waiting for the model;
- ``riskva_images_total`` and ``riskva_images_per_second`` (answered images, the latter over the
  last minute, for a dashboard without a ``rate()``);
- ``riskva_ready``: 1 while the model is loaded and its worker alive;
- ``riskva_trace_gaps_total{reason}``: answers that went out but whose MLflow trace was not
  written (tracing.py ``GAP_REASONS``: ``queue_full``, ``store_down``, ``export_failed``,
  ``photo_not_stored``); every reason at 0 from the start.

Each app has its own registry, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

IMAGES_WINDOW_S = 60.0
OUTCOMES = ("answered", "failed", "expired", "cancelled", "refused")
REASONS = {"failed": ("out_of_memory", "worker_died", "error"),
           "refused": ("invalid_request", "too_large", "server_busy", "model_loading")}


class ServingMetrics:
    def __init__(self, queue_depth: Callable[[], float], ready: Callable[[], bool]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.received = Counter("riskva_requests_received", "Chat-completion requests received",
                                registry=self.registry)
        self.outcomes = {
            outcome: Counter(f"riskva_requests_{outcome}", f"Chat-completion requests {outcome}",
                             ["reason"] if outcome in REASONS else [], registry=self.registry)
            for outcome in OUTCOMES}
        for outcome, reasons in REASONS.items():  # every series exists from the start, at 0
            for reason in reasons:
                self.outcomes[outcome].labels(reason=reason)
        self.requests = Counter("riskva_requests", "Chat-completion requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("riskva_request_latency_seconds", "Chat-completion latency",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
                                 registry=self.registry)
        self.batch_size = Histogram("riskva_batch_size", "Requests per generate batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.images = Counter("riskva_images", "Images answered", registry=self.registry)
        Gauge("riskva_queue_depth", "Requests waiting for the model",
              registry=self.registry).set_function(queue_depth)
        Gauge("riskva_images_per_second", f"Images answered per second over the last {IMAGES_WINDOW_S:.0f} s",
              registry=self.registry).set_function(self.images_per_second)
        Gauge("riskva_ready", "1 while the model is loaded and its worker alive", registry=self.registry
              ).set_function(lambda: float(ready()))
        from riskva_core.registry.tracing import gap_counter

        self.trace_gaps = gap_counter(self.registry)
        self._started = time.monotonic()
        self._done: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def observe_received(self) -> None:
        self.received.inc()

    def observe_request(self, outcome: str, status: int, seconds: float, reason: str | None = None) -> None:
        """One request ended: how (``OUTCOMES``, with a reason for failed/refused), its status, latency."""
        counter = self.outcomes[outcome]
        (counter.labels(reason=reason) if outcome in REASONS else counter).inc()
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        if outcome == "answered":
            self.images.inc()
            with self._lock:
                self._done.append(time.monotonic())

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0] < now - IMAGES_WINDOW_S:
                self._done.popleft()
            count = len(self._done)
        return count / max(1e-9, min(IMAGES_WINDOW_S, now - self._started))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
