"""Dynamic batching for one model copy: concurrent requests become one ``generate`` batch.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes the
oldest, then keeps collecting until it holds ``max_batch`` requests (the model's
``batch_size``) or ``max_wait_s`` has passed since it took the first one, and answers them as
one batch. While a batch generates, new requests queue up, so under load the next batch is
full at once and the wait never applies: the wait (default 5 ms, a fraction of one decoding
step of a 7B model) only costs a lone request, and buys the first requests of a burst a
shared batch instead of a batch of one.

- A full queue refuses at once (``QueueFull``, the server's 503 with ``Retry-After``): a
  client retries later instead of piling up work the server cannot finish in time.
- A request whose deadline passed while it waited is dropped before it reaches the model
  (``DeadlineExceeded``, the server's 504); one that the caller stopped waiting for
  (``Future.cancel``) is skipped likewise.
- An exception of the batch function reaches every request of that batch.
"""
from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_QUEUE = 256


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests; ``retry_after`` is an estimate in whole seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the server is busy: {depth} requests are waiting (max_queue)")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


@dataclasses.dataclass
class _Job:
    payload: Any
    size: int
    deadline: float  # time.monotonic()
    future: Future


class Batcher:
    """``submit(payload)`` → a ``Future`` of ``run_batch([payloads])[i]``.

    ``run_batch`` returns one outcome per payload; an outcome that is an exception is raised
    to that request only. ``max_batch_bytes`` caps the summed ``size`` of a batch (the
    model's ``max_request_bytes``), so a batch is never refused for what its requests carry.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch: int,
                 max_wait_s: float = DEFAULT_MAX_WAIT_MS / 1000, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_batch_bytes: int | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_wait_s >= 0, got "
                             f"{max_batch}, {max_queue}, {max_wait_s}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, int(max_batch), float(max_wait_s)
        self.max_queue, self.max_batch_bytes, self.on_batch = int(max_queue), max_batch_bytes, on_batch
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=self.max_queue)
        self._held: _Job | None = None  # taken from the queue but over the byte cap: first of the next batch
        self._batch_seconds = 1.0  # running estimate of one batch's duration, for Retry-After
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="riskva-batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def depth(self) -> int:
        """Requests waiting for the model (not counting the batch that is generating)."""
        return self._queue.qsize() + (self._held is not None)

    def submit(self, payload: Any, *, deadline: float, size: int = 0) -> Future:
        job = _Job(payload, size, deadline, Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            batches = math.ceil(self.max_queue / self.max_batch)
            raise QueueFull(self.max_queue, max(1, math.ceil(batches * self._batch_seconds))) from None
        return job.future

    # --- worker ----------------------------------------------------------------
    def _take(self, timeout: float) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self) -> list[_Job]:
        first = self._take(timeout=0.2)
        if first is None:
            return []
        batch, size = [first], first.size
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            job = self._take(timeout=max(0.0, until - time.monotonic()))
            if job is None:
                break
            if self.max_batch_bytes and size + job.size > self.max_batch_bytes:
                self._held = job
                break
            batch.append(job)
            size += job.size
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            live = []
            now = time.monotonic()
            for job in self._collect():
                if not job.future.set_running_or_notify_cancel():
                    continue  # its caller gave up (deadline, disconnect)
                if job.deadline <= now:
                    job.future.set_exception(DeadlineExceeded("the request waited past its deadline"))
                else:
                    live.append(job)
            if not live:
                continue
            start = time.monotonic()
            try:
                outcomes = list(self.run_batch([job.payload for job in live]))
                if len(outcomes) != len(live):
                    raise RuntimeError(f"run_batch answered {len(outcomes)} of {len(live)} requests")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                outcomes = [exc] * len(live)
            elapsed = time.monotonic() - start
            self._batch_seconds = 0.7 * self._batch_seconds + 0.3 * elapsed
            if self.on_batch is not None:
                self.on_batch(len(live), elapsed)
            for job, outcome in zip(live, outcomes):
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
