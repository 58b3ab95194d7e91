"""Prometheus metrics of the OpenAI-compatible server (``GET /metrics``, prometheus-client).

- ``riskva_requests_total{status}``: chat-completion requests by HTTP status;
- ``riskva_request_latency_seconds``: request latency (histogram);
- ``riskva_batch_size``: requests per generate batch (histogram);
- ``riskva_queue_depth``: requests waiting for the model;
- ``riskva_images_total`` and ``riskva_images_per_second`` (answered images, the latter over the
  last minute, for a dashboard without a ``rate()``);
- ``riskva_ready``: 1 once the model is loaded.

Each app has its own registry, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

IMAGES_WINDOW_S = 60.0


class ServingMetrics:
    def __init__(self, queue_depth: Callable[[], float], ready: Callable[[], bool]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
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
        Gauge("riskva_ready", "1 once the model is loaded", registry=self.registry).set_function(
            lambda: float(ready()))
        self._started = time.monotonic()
        self._done: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)
        with self._lock:
            self._done.append((time.monotonic(), size))

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - IMAGES_WINDOW_S:
                self._done.popleft()
            count = sum(n for _, n in self._done)
        return count / max(1e-9, min(IMAGES_WINDOW_S, now - self._started))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
