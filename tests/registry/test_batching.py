"""The batcher on its own (no model): who shares a batch, cancelled requests free their slot at
once and never run, deadlines are judged when the batch is collected, a dead worker says so."""
from __future__ import annotations

import ctypes
import threading
import time

import pytest

from riskva_core.registry.batching import Batcher, DeadlineExceeded, QueueFull, WorkerDied


class Recorder:
    """A batch function that takes ``seconds`` per batch and records what it was given."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.batches = seconds, []
        self.started = threading.Event()

    def __call__(self, payloads, key):
        self.batches.append((key, list(payloads)))
        self.started.set()
        time.sleep(self.seconds)
        return [p * 10 for p in payloads]


def _later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def test_only_requests_with_the_same_key_share_a_batch_and_the_oldest_goes_first():
    run = Recorder(0.2)
    batcher = Batcher(run, max_batch=4, max_wait_s=0.05, max_queue=16)
    futures = [batcher.submit(i, deadline=_later(), key="greedy" if i % 2 else ("sampled", i)) for i in range(6)]
    batcher.start()
    try:
        assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40, 50]
    finally:
        batcher.stop()
    assert run.batches[0] == (("sampled", 0), [0])  # the oldest starts the first batch, alone with its key
    assert ("greedy", [1, 3, 5]) in run.batches
    assert sorted(p for _, batch in run.batches for p in batch) == list(range(6))


def test_a_cancelled_request_frees_its_slot_at_once_and_never_runs():
    run = Recorder(0.5)
    batcher = Batcher(run, max_batch=1, max_wait_s=0, max_queue=2).start()
    try:
        running = batcher.submit(1, deadline=_later())
        assert run.started.wait(5)
        waiting = [batcher.submit(i, deadline=_later()) for i in (2, 3)]
        with pytest.raises(QueueFull):
            batcher.submit(4, deadline=_later())
        assert not running.cancel()  # its batch runs: the caller can only drop its answer
        assert all(f.cancel() for f in waiting)
        assert batcher.depth() == 0
        fresh = batcher.submit(5, deadline=_later())  # the freed slots take new requests at once
        assert fresh.result(timeout=10) == 50 and running.result(timeout=10) == 10
    finally:
        batcher.stop()
    assert [batch for _, batch in run.batches] == [[1], [5]]


def test_the_deadline_is_judged_after_the_wait_for_companions():
    run = Recorder()
    batcher = Batcher(run, max_batch=4, max_wait_s=0.2, max_queue=4).start()
    try:
        late = batcher.submit(1, deadline=time.monotonic() + 0.05)  # alive when taken, dead when its batch closes
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=10)
    finally:
        batcher.stop()
    assert run.batches == []


def test_an_exception_of_the_batch_reaches_its_requests_and_the_worker_goes_on():
    calls = []

    def flaky(payloads, key):
        calls.append(payloads)
        if len(calls) == 1:
            raise ValueError("one bad batch")
        return payloads

    batcher = Batcher(flaky, max_batch=2, max_wait_s=0, max_queue=4).start()
    try:
        with pytest.raises(ValueError, match="one bad batch"):
            batcher.submit(1, deadline=_later()).result(timeout=10)
        assert batcher.submit(2, deadline=_later()).result(timeout=10) == 2 and batcher.alive()
    finally:
        batcher.stop()


def test_a_worker_that_dies_fails_every_waiting_request_and_tells_its_owner():
    run = Recorder(0.3)
    deaths: list[BaseException] = []
    batcher = Batcher(run, max_batch=1, max_wait_s=0, max_queue=8, on_death=deaths.append).start()
    running = batcher.submit(1, deadline=_later())
    assert run.started.wait(5)
    waiting = batcher.submit(2, deadline=_later())
    # What a fatal error in the worker thread looks like: an exception raised inside it, from outside.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(batcher._thread.ident), ctypes.py_object(SystemExit))
    for future in (running, waiting):
        with pytest.raises(WorkerDied):
            future.result(timeout=10)
    assert not batcher.alive() and len(deaths) == 1 and isinstance(deaths[0], SystemExit)
    with pytest.raises(WorkerDied):
        batcher.submit(3, deadline=_later())
