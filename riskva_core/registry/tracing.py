"""One MLflow trace per served request, written off the request path; the photo stored once by hash.

What a trace holds (MLflow 3 tracing, one root span ``riskva.answer`` whose start and end are the
request's own, so the trace's timestamp is when the request came in and its duration the latency;
``mlflow.start_span_no_context`` rather than ``mlflow.start_span``/``@mlflow.trace``, because the span
is written later, on another thread, with the request's own start and end times):

- tags (searchable with ``mlflow.search_traces(filter_string="tags.`riskva.source` = 'serve'")``):
  ``riskva.source`` = ``serve``, ``riskva.photo_sha256``, ``riskva.model_name``,
  ``riskva.model_version``, ``riskva.model_alias``, ``riskva.api``, ``riskva.parse_ok``,
  ``riskva.level`` and ``riskva.level_confidence``;
- span inputs: the photo's sha256, its size and whether it was kept; never the photo itself
  (a trace is a row in the tracking store, and a store full of photos is slow to search and
  hard to purge);
- span outputs: the four fields, ``parse_ok``, the 风险等级 confidence and the raw answer;
- span attributes: ``riskva.latency_s``.

Photo retention: with ``photo_dir`` set (the default: ``DataRoot.field_photos``), each photo is
written once under ``<sha256[:2]>/<sha256>.<ext>``, so a photo answered many times is stored once
and the review queue can show it. Field photos can show people (workers, faces, number plates):
``RISKVA_RETAIN_FIELD_PHOTOS=0`` keeps only the hash, and deleting a file removes the photo
everywhere (the traces never held it). Retention periods are the operator's policy: the folder
is plain files, one per photo, dated by their mtime.

Tracing never fails or slows a request. ``FieldTracer.record`` only puts the answer on a bounded
queue (no hashing, no I/O on the caller's thread); a worker thread hashes, stores and exports.
A trace that cannot be written is a *gap*, counted by reason and handed to ``on_gap`` (the
serving metrics' counter), never raised:

- ``queue_full``: the writer is behind (e.g. a remote store that answers slowly);
- ``store_down``: the tracking server does not answer its ``/health`` within ``probe_timeout_s``;
  after a failed probe nothing is sent for ``retry_after_s`` (MLflow's own REST client would
  retry each call with back-off for minutes, and the queue would fill behind it);
- ``export_failed``: MLflow's exporter failed (it logs and swallows the error: MLflow tracing is
  best-effort by design, so the failure is read from the warning it logs on this thread);
- ``photo_not_stored``: the photo folder is not writable (the trace is still written).

The export is synchronous on the worker thread (``MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false`` for
this process): MLflow's own async queue would hide failures from the gap count, and a trace is
only searchable once flushed ("Trace not found" on a just-written trace, measured in issue 28).
The worker is already off the request path, so nothing is lost by it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

from riskva_core import atomic
from riskva_core.schema import FIELD_LEVEL, FIELDS

log = logging.getLogger(__name__)

FIELD_EXPERIMENT = "riskva-field"
SPAN_NAME = "riskva.answer"
SOURCE_SERVE = "serve"
TAG_SOURCE = "riskva.source"
TAG_PHOTO = "riskva.photo_sha256"
TAG_MODEL = "riskva.model_name"
TAG_VERSION = "riskva.model_version"
TAG_ALIAS = "riskva.model_alias"
TAG_API = "riskva.api"
TAG_PARSE_OK = "riskva.parse_ok"
TAG_LEVEL = "riskva.level"
TAG_CONFIDENCE = "riskva.level_confidence"
ATTR_LATENCY = "riskva.latency_s"
GAP_REASONS = ("queue_full", "store_down", "export_failed", "photo_not_stored")

ENV_TRACING = "RISKVA_TRACE_REQUESTS"  # "0": no traces at all
ENV_RETAIN_PHOTOS = "RISKVA_RETAIN_FIELD_PHOTOS"  # "0": only the photo's hash is recorded
ENV_TRACKING_URI = "RISKVA_MLFLOW_TRACKING_URI"
_OFF = ("0", "false", "no", "off")
# Image signatures → file extension; anything else is stored as .bin (it was answered, so it decoded).
_SIGNATURES = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
               (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    """Where traces and photos go, and how long a down store is left alone."""

    tracking_uri: str
    experiment_name: str = FIELD_EXPERIMENT
    photo_dir: Path | None = None  # None: photo retention off, only the sha256 is recorded
    artifact_root: str | None = None  # used when the experiment is created (local stores)
    queue_size: int = 1000  # answers waiting to be written; past it a trace is a gap, never a wait
    probe_timeout_s: float = 1.0
    retry_after_s: float = 30.0  # after a failed probe of a remote store, no write is tried for this long
    healthy_for_s: float = 10.0  # a successful probe is trusted this long (not one probe per trace)

    @classmethod
    def from_env(cls, data_root: Any = None) -> "TracingConfig | None":
        """The serving process's tracing: None when ``RISKVA_TRACE_REQUESTS=0``. The store is
        ``$RISKVA_MLFLOW_TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``, else the data root's sqlite."""
        from riskva_core.paths import DataRoot

        if os.environ.get(ENV_TRACING, "1").strip().lower() in _OFF:
            return None
        root = data_root or DataRoot.from_env()
        uri = os.environ.get(ENV_TRACKING_URI) or os.environ.get("MLFLOW_TRACKING_URI") or root.mlflow_tracking_uri
        keep = os.environ.get(ENV_RETAIN_PHOTOS, "1").strip().lower() not in _OFF
        return cls(tracking_uri=uri, photo_dir=root.field_photos if keep else None,
                   artifact_root=str(root.mlflow_artifact_root))


@dataclasses.dataclass(frozen=True)
class ServedAnswer:
    """One served request, as the server saw it. ``started_ns`` is wall-clock (``time.time_ns()``)."""

    photo: bytes
    model_name: str
    model_version: str
    alias: str | None
    started_ns: int
    latency_s: float
    fields: Mapping[str, str | None]
    parse_ok: bool
    level_confidence: float | None = None
    raw_output: str = ""
    api: str = ""  # "openai" or "mlflow"

    @classmethod
    def from_row(cls, row: Mapping[str, Any], photo: bytes, *, model_name: str, model_version: str,
                 alias: str | None, started_ns: int, latency_s: float, api: str) -> "ServedAnswer":
        """An output row of the pyfunc (``schema.OUTPUT_COLUMNS``, plus ``level_confidence`` when the
        model reports one) for the photo it answered."""
        confidence = row.get("level_confidence")
        return cls(photo=photo, model_name=model_name, model_version=str(model_version), alias=alias,
                   started_ns=int(started_ns), latency_s=float(latency_s),
                   fields={f: str(row.get(f) or "") for f in FIELDS}, parse_ok=bool(row.get("parse_ok")),
                   level_confidence=None if confidence is None or confidence != confidence else float(confidence),
                   raw_output=str(row.get("raw_output") or ""), api=api)


def photo_extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for sig, ext in _SIGNATURES if data.startswith(sig)), "bin")


def store_photo(folder: Path, data: bytes, sha256: str | None = None) -> Path:
    """Write ``data`` once under its hash (atomically); an existing copy is left as it is."""
    sha = sha256 or hashlib.sha256(data).hexdigest()
    path = Path(folder) / sha[:2] / f"{sha}.{photo_extension(data)}"
    if not path.is_file():
        atomic.write_bytes(path, data)
    return path


def find_photo(folder: Path, sha256: str) -> Path | None:
    """The stored photo with this hash, or None (retention off, or removed by the operator)."""
    found = sorted((Path(folder) / sha256[:2]).glob(f"{sha256}.*"))
    return found[0] if found else None


def trace_tags(answer: ServedAnswer, sha256: str) -> dict[str, str]:
    conf = answer.level_confidence
    return {TAG_SOURCE: SOURCE_SERVE, TAG_PHOTO: sha256, TAG_MODEL: answer.model_name,
            TAG_VERSION: str(answer.model_version), TAG_ALIAS: answer.alias or "", TAG_API: answer.api,
            TAG_PARSE_OK: "true" if answer.parse_ok else "false",
            TAG_LEVEL: answer.fields.get(FIELD_LEVEL) or "", TAG_CONFIDENCE: "" if conf is None else f"{conf:.6f}"}


class _ExportComplaints(logging.Handler):
    """Counts the warnings MLflow's tracing logs on one thread: its exporter swallows a failed export
    and only logs it, and that warning on the writer's thread is the only sign a trace was lost."""

    def __init__(self, thread_id: int):
        super().__init__(logging.WARNING)
        self.thread_id = thread_id
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.count += 1


class FieldTracer:
    """Records served answers as MLflow traces from a worker thread; see the module docstring.

    ``on_gap(reason)`` is called once per lost trace (on whichever thread lost it), e.g. a
    Prometheus counter's ``labels(reason=reason).inc``; ``gaps()`` is the same count as a dict.
    """

    def __init__(self, config: TracingConfig, on_gap: Callable[[str], None] | None = None):
        self.config = config
        self._on_gap = on_gap
        self._queue: queue.Queue[ServedAnswer | None] = queue.Queue(maxsize=max(1, config.queue_size))
        self._gaps: Counter[str] = Counter()
        self._written = 0
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._experiment_id: str | None = None
        self._down_until = 0.0
        self._healthy_until = 0.0
        self._thread = threading.Thread(target=self._work, name="riskva-tracer", daemon=True)
        self._thread.start()

    # --- the request thread's side: O(1), never raises ------------------------------------
    def record(self, answer: ServedAnswer) -> None:
        """Queue one answer for tracing; a full queue is a gap, never a wait."""
        try:
            with self._lock:
                self._pending += 1
            self._queue.put_nowait(answer)
        except queue.Full:
            self._done()
            self._gap("queue_full")
        except Exception:  # noqa: BLE001 - tracing must never fail a request
            log.exception("queueing a trace failed")

    def gaps(self) -> dict[str, int]:
        with self._lock:
            return {reason: self._gaps.get(reason, 0) for reason in GAP_REASONS}

    @property
    def written(self) -> int:
        with self._lock:
            return self._written

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued answer is written or counted as a gap (shutdown, tests of the store)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Write what is queued (up to ``timeout_s``) and stop the worker."""
        done = self.flush(timeout_s)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=max(0.1, timeout_s if not done else 5.0))
        return done

    # --- the worker -------------------------------------------------------------------------
    def _gap(self, reason: str) -> None:
        with self._lock:
            self._gaps[reason] += 1
        if self._on_gap is not None:
            try:
                self._on_gap(reason)
            except Exception:  # noqa: BLE001 - a metrics callback must not stop the writer
                log.exception("the gap callback failed")

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def _work(self) -> None:
        complaints = _ExportComplaints(threading.get_ident())
        logging.getLogger("mlflow.tracing").addHandler(complaints)
        try:
            while (answer := self._queue.get()) is not None:
                try:
                    self._write(answer, complaints)
                except Exception:  # noqa: BLE001 - one bad trace must not stop the writer
                    log.exception("writing a trace failed")
                    self._gap("export_failed")
                finally:
                    self._done()
        finally:
            logging.getLogger("mlflow.tracing").removeHandler(complaints)

    def _write(self, answer: ServedAnswer, complaints: _ExportComplaints) -> None:
        sha = hashlib.sha256(answer.photo).hexdigest()
        stored = False
        if self.config.photo_dir is not None:
            try:
                store_photo(self.config.photo_dir, answer.photo, sha)
                stored = True
            except OSError as exc:
                log.warning("field photo %s not stored: %s", sha[:12], exc)
                self._gap("photo_not_stored")
        if not self._store_available():
            self._gap("store_down")
            return
        before = complaints.count
        try:
            ok = self._export(answer, sha, stored)
        except Exception as exc:  # noqa: BLE001 - counted, logged once per failure, never raised
            log.warning("trace not written (%s: %s)", type(exc).__name__, exc)
            self._experiment_id = None  # a store that came back may need the experiment again
            ok = False
        if not ok or complaints.count != before:
            self._gap("export_failed")
            return
        with self._lock:
            self._written += 1

    def _store_available(self) -> bool:
        """False while a remote store is known down; probes its ``/health`` at most every few seconds."""
        uri = self.config.tracking_uri
        if not uri.startswith(("http://", "https://")):
            return True  # a local store (sqlite, file): its own error is the export failure
        now = time.monotonic()
        if now < self._down_until:
            return False
        if now < self._healthy_until:
            return True
        import requests

        try:
            ok = requests.get(uri.rstrip("/") + "/health", timeout=self.config.probe_timeout_s).status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            self._healthy_until = now + self.config.healthy_for_s
        else:
            self._down_until = now + self.config.retry_after_s
            self._experiment_id = None
            log.warning("tracking store %s is not answering: traces are counted as gaps for %.0f s",
                        uri, self.config.retry_after_s)
        return ok

    def _experiment(self) -> str:
        import mlflow
        from mlflow import MlflowClient

        if self._experiment_id is None:
            # Synchronous export on this worker thread (module docstring); read when the exporter is
            # built, which set_tracking_uri/reset make happen again.
            os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
            if mlflow.get_tracking_uri() != self.config.tracking_uri:
                mlflow.set_tracking_uri(self.config.tracking_uri)
            mlflow.tracing.reset()
            client = MlflowClient(self.config.tracking_uri)
            experiment = client.get_experiment_by_name(self.config.experiment_name)
            if experiment is None:
                try:
                    location = None
                    if self.config.artifact_root:
                        location = Path(self.config.artifact_root).as_uri() if "://" not in self.config.artifact_root \
                            else self.config.artifact_root
                    client.create_experiment(self.config.experiment_name, artifact_location=location)
                except Exception:  # noqa: BLE001 - another worker process created it first
                    pass
                experiment = client.get_experiment_by_name(self.config.experiment_name)
            self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _export(self, answer: ServedAnswer, sha: str, stored: bool) -> bool:
        import mlflow

        experiment_id = self._experiment()
        outputs: dict[str, Any] = {f: answer.fields.get(f) or "" for f in FIELDS}
        outputs.update(parse_ok=bool(answer.parse_ok), level_confidence=answer.level_confidence,
                       raw_output=answer.raw_output)
        span = mlflow.start_span_no_context(
            SPAN_NAME, span_type="LLM", experiment_id=experiment_id, start_time_ns=int(answer.started_ns),
            inputs={"photo_sha256": sha, "photo_bytes": len(answer.photo), "photo_stored": stored},
            attributes={ATTR_LATENCY: float(answer.latency_s)}, tags=trace_tags(answer, sha))
        span.end(outputs=outputs, end_time_ns=int(answer.started_ns) + round(answer.latency_s * 1e9))
        # MLflow hands out a no-op span (no trace id) when it could not start a trace at all.
        return bool(getattr(span, "trace_id", None)) and not str(span.trace_id).startswith("MLFLOW_NO_OP")


def model_identity(model_uri: str, version: str | None = None, tracking_uri: str | None = None
                   ) -> tuple[str, str, str | None]:
    """(name, version, alias) of what a server serves, resolved once at load: ``models:/riskva@champion``
    → the alias's version, ``models:/riskva/3`` → 3 with no alias, any other URI → its name as
    ``riskva`` and version ``unknown``. A registry that does not answer leaves ``unknown`` (the
    answer is still traced, and still served)."""
    import re

    match = re.match(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$", model_uri or "")
    if match is None:
        return "riskva", str(version or "unknown"), None
    name, alias = match["name"], match["alias"]
    if version is None and match["version"]:
        version = match["version"]
    if version is None and alias:
        try:
            from mlflow import MlflowClient

            version = str(MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version)
        except Exception as exc:  # noqa: BLE001 - never stops a server from starting
            log.warning("the version behind %s is unknown (%s: %s)", model_uri, type(exc).__name__, exc)
    return name, str(version or "unknown"), alias


def gap_counter(registry: Any) -> Any:
    """``riskva_trace_gaps_total{reason}`` on a Prometheus registry, every reason at 0 from the start."""
    from prometheus_client import Counter

    counter = Counter("riskva_trace_gaps", "Served answers whose trace was not written", ["reason"],
                      registry=registry)
    for reason in GAP_REASONS:
        counter.labels(reason=reason)
    return counter


def start_tracer(config: TracingConfig | None, counter: Any) -> FieldTracer | None:
    """The process's tracer (None when tracing is off), its gaps counted on ``counter``."""
    if config is None:
        return None
    return FieldTracer(config, on_gap=lambda reason: counter.labels(reason=reason).inc())


def record_row(tracer: FieldTracer | None, row: Mapping[str, Any], photo: bytes, identity: tuple,
               started_ns: int, latency_s: float, api: str) -> None:
    """Queue one served row for tracing; never raises (a bad row is logged, the answer already went out)."""
    if tracer is None:
        return
    try:
        name, version, alias = identity
        tracer.record(ServedAnswer.from_row(row, photo, model_name=name, model_version=version, alias=alias,
                                            started_ns=started_ns, latency_s=latency_s, api=api))
    except Exception:  # noqa: BLE001 - tracing never fails a request
        log.exception("queueing a trace failed")
