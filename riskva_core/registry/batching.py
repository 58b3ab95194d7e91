"""Dynamic batching for one model copy: concurrent requests become one ``generate`` batch.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes the
oldest, then keeps collecting requests with the same ``key`` (the same generation settings)
until it holds ``max_batch`` of them (the model's ``batch_size``) or ``max_wait_s`` has passed
since it took the first one, and answers them as one batch. While a batch generates, new
requests queue up, so under load the next batch is full at once and the wait never applies:
the wait (default 5 ms, a fraction of one decoding step of a 7B model) only costs a lone
request, and buys the first requests of a burst a shared batch instead of a batch of one.
Requests with other settings stay queued in their order; the oldest waiting request always
starts the next batch, so no setting starves another.

- A full queue refuses at once (``QueueFull``, the server's 503 with ``Retry-After``): a
  client retries later instead of piling up work the server cannot finish in time.
- A request the caller gave up on (``Future.cancel()``: the client hung up) leaves the queue
  at once, from the future's own done-callback: its slot is free for the next request and it
  never reaches the model. Cancelling a request whose batch already runs is refused by the
  future (it is running); the caller then just drops the answer when it comes.
- A request whose deadline passed is dropped before it reaches the model
  (``DeadlineExceeded``, the server's 504), judged by the clock once its batch is collected.
- An ``Exception`` of the batch function reaches every request of that batch, and the worker
  goes on. Anything else that escapes the loop (``SystemExit``, ``KeyboardInterrupt``, a bug
  here) ends the worker: every waiting request gets ``WorkerDied``, ``submit`` raises it from
  then on, ``alive()`` is false and ``on_death(exc)`` tells the owner (the server then answers
  ``/ready`` with 503 and exits non-zero, so its supervisor restarts it).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_QUEUE = 256
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests; ``retry_after`` is an estimate in whole seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the server is busy: {depth} requests are waiting (max_queue)")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


class WorkerDied(Exception):
    """The batching worker has stopped: no request will be answered by this process."""


@dataclasses.dataclass(eq=False)  # identity: a job is removed from the queue by itself, not by value
class _Job:
    payload: Any
    size: int
    deadline: float  # time.monotonic()
    key: Hashable
    future: Future


class Batcher:
    """``submit(payload, key=k)`` → a ``Future`` of ``run_batch([payloads], k)[i]``.

    ``run_batch`` returns one outcome per payload; an outcome that is an exception is raised
    to that request only. Only requests with equal ``key`` share a batch. ``max_batch_bytes``
    caps the summed ``size`` of a batch (the model's ``max_request_bytes``), so a batch is never
    refused for what its requests carry.
    """

    def __init__(self, run_batch: Callable[[list[Any], Hashable], Sequence[Any]], *, max_batch: int,
                 max_wait_s: float = DEFAULT_MAX_WAIT_MS / 1000, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_batch_bytes: int | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_wait_s >= 0, got "
                             f"{max_batch}, {max_queue}, {max_wait_s}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, int(max_batch), float(max_wait_s)
        self.max_queue, self.max_batch_bytes, self.on_batch = int(max_queue), max_batch_bytes, on_batch
        self.on_death = on_death
        self.failure: BaseException | None = None
        self._waiting: collections.deque[_Job] = collections.deque()
        self._running: list[_Job] = []
        self._cond = threading.Condition()
        self._batch_seconds = 1.0  # running estimate of one batch's duration, for Retry-After
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="riskva-batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    def depth(self) -> int:
        """Requests waiting for the model (not counting the batch that is generating)."""
        return len(self._waiting)

    def submit(self, payload: Any, *, deadline: float, size: int = 0, key: Hashable = None) -> Future:
        job = _Job(payload, size, deadline, key, Future())
        with self._cond:
            if self.failure is not None:
                raise WorkerDied(f"the batching worker has stopped ({type(self.failure).__name__})")
            if len(self._waiting) >= self.max_queue:
                batches = math.ceil(self.max_queue / self.max_batch)
                raise QueueFull(self.max_queue, max(1, math.ceil(batches * self._batch_seconds)))
            self._waiting.append(job)
            self._cond.notify_all()
        job.future.add_done_callback(lambda future: self._forget(job) if future.cancelled() else None)
        return job.future

    def _forget(self, job: _Job) -> None:
        """A cancelled request leaves the queue now (it may already be taken: then the worker skips it)."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    # --- worker ----------------------------------------------------------------
    def _companion(self, key: Hashable, size: int) -> _Job | None:
        """The oldest waiting request that may join a batch of ``key`` holding ``size`` bytes."""
        for job in self._waiting:
            if job.key == key:
                if self.max_batch_bytes and size + job.size > self.max_batch_bytes:
                    return None  # it starts a later batch; younger ones do not overtake it
                self._waiting.remove(job)
                return job
        return None

    def _collect(self) -> list[_Job]:
        with self._cond:
            if not self._waiting:
                self._cond.wait(timeout=0.2)
            if not self._waiting or self._stop.is_set():
                return []
            first = self._waiting.popleft()
            batch, size = [first], first.size
            until = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                job = self._companion(first.key, size)
                if job is not None:
                    batch.append(job)
                    size += job.size
                    continue
                left = until - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    break
                self._cond.wait(timeout=left)  # woken by each new request
            return batch

    def _work(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the worker is gone: say so to everyone waiting
            self.failure = exc
            log.critical("the batching worker died (%s: %s); no request can be answered", type(exc).__name__, exc,
                         exc_info=exc)
            with self._cond:
                orphans = [*self._running, *self._waiting]
                self._waiting.clear()
            died = WorkerDied(f"the batching worker has stopped ({type(exc).__name__})")
            for job in orphans:
                future = job.future
                if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
                    future.set_exception(died)
            if self.on_death is not None:
                self.on_death(exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._running = self._collect()
            now = time.monotonic()  # after collecting: the wait for companions counts against deadlines
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # its caller gave up (disconnect) between collecting and now
                if job.deadline <= now:
                    job.future.set_exception(DeadlineExceeded("the request waited past its deadline"))
                else:
                    live.append(job)
            if not live:
                continue
            self._running = live
            start = time.monotonic()
            try:
                outcomes = list(self.run_batch([job.payload for job in live], live[0].key))
                if len(outcomes) != len(live):
                    raise RuntimeError(f"run_batch answered {len(outcomes)} of {len(live)} requests")
            except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
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
            self._running = []
