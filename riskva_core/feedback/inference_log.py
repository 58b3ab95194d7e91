"""A day's served answers as one Parquet table: the traces of that UTC day, one row per trace.

The traces stay the record (tracing.py); this table is the day's snapshot that drift, the review
queue and the field accuracy read, so they never page through the tracking store themselves, and
a day's partition is reproducible from its file. The day is a UTC window ``[00:00, 24:00)`` on the
trace's timestamp, which is the request's arrival (tracing.py starts the span then). Rows are
ordered by time, then trace id, so the same traces give the same bytes.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from riskva_core import atomic
from riskva_core.errors import RiskvaError
from riskva_core.registry.tracing import (ATTR_LATENCY, FIELD_EXPERIMENT, SOURCE_SERVE, TAG_ALIAS, TAG_API,
                                          TAG_MODEL, TAG_PARSE_OK, TAG_PHOTO, TAG_SOURCE, TAG_VERSION, find_photo)
from riskva_core.schema import FIELDS

SCHEMA = pa.schema([
    ("trace_id", pa.string()),
    ("timestamp", pa.timestamp("ms", tz="UTC")),
    ("photo_sha256", pa.string()),
    ("photo_path", pa.string()),  # the stored photo, "" when retention is off or it was removed
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_alias", pa.string()),
    ("api", pa.string()),
    ("latency_s", pa.float64()),
    ("parse_ok", pa.bool_()),
    *((field, pa.string()) for field in FIELDS),
    ("level_confidence", pa.float64()),  # null when the server measured none
    ("raw_output", pa.string()),
])


@dataclasses.dataclass(frozen=True)
class InferenceLogConfig:
    tracking_uri: str
    day: dt.date
    output_path: Path
    experiment_name: str = FIELD_EXPERIMENT
    photo_dir: Path | None = None  # where tracing stored the photos, to fill ``photo_path``
    page_size: int = 500


@dataclasses.dataclass(frozen=True)
class InferenceLogResult:
    path: Path
    rows: int
    parse_rate: float | None  # None for a day without traces
    model_versions: dict[str, int]  # version → answers
    sha256: str  # of the file: the partition's data version


def day_window_ms(day: dt.date) -> tuple[int, int]:
    """``[start, end)`` of the UTC day in epoch milliseconds."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
    ms = int(start.timestamp() * 1000)
    return ms, ms + 86_400_000


def day_filter(day: dt.date) -> str:
    start, end = day_window_ms(day)
    return f"timestamp_ms >= {start} AND timestamp_ms < {end} AND tags.`{TAG_SOURCE}` = '{SOURCE_SERVE}'"


def day_traces(config: InferenceLogConfig) -> Iterator[Any]:
    """The day's served traces, page by page. An unreachable store is a one-line RiskvaError."""
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking_uri)
    try:
        experiment = client.get_experiment_by_name(config.experiment_name)
        if experiment is None:
            return  # nothing was ever served (tracing creates the experiment with its first trace)
        token = None
        while True:
            page = client.search_traces(locations=[experiment.experiment_id], filter_string=day_filter(config.day),
                                        max_results=config.page_size, page_token=token,
                                        order_by=["timestamp_ms ASC"])
            yield from page
            token = page.token
            if not token:
                return
    except RiskvaError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store's own errors, shown in one line
        raise RiskvaError(f"reading the traces of {config.day} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def trace_row(trace: Any, photo_dir: Path | None = None) -> dict[str, Any]:
    """One trace as a row of ``SCHEMA``; the span's outputs hold the fields, the tags the rest."""
    tags = trace.info.tags
    span = next((s for s in trace.data.spans if s.parent_id is None), trace.data.spans[0]) if trace.data.spans else None
    outputs = (span.outputs if span is not None else None) or {}
    sha = tags.get(TAG_PHOTO, "")
    stored = find_photo(photo_dir, sha) if photo_dir is not None and sha else None
    latency = (span.attributes.get(ATTR_LATENCY) if span is not None else None)
    confidence = outputs.get("level_confidence")
    return {
        "trace_id": trace.info.trace_id,
        "timestamp": dt.datetime.fromtimestamp(trace.info.timestamp_ms / 1000, tz=dt.timezone.utc),
        "photo_sha256": sha,
        "photo_path": str(stored) if stored else "",
        "model_name": tags.get(TAG_MODEL, ""),
        "model_version": tags.get(TAG_VERSION, ""),
        "model_alias": tags.get(TAG_ALIAS, ""),
        "api": tags.get(TAG_API, ""),
        "latency_s": float(latency) if latency is not None else (trace.info.execution_duration or 0) / 1000,
        "parse_ok": tags.get(TAG_PARSE_OK) == "true",
        **{field: str(outputs.get(field) or "") for field in FIELDS},
        "level_confidence": float(confidence) if confidence is not None else None,
        "raw_output": str(outputs.get("raw_output") or ""),
    }


def write_inference_log(config: InferenceLogConfig) -> InferenceLogResult:
    """Write the day's table atomically (an empty table for a day without traces)."""
    rows = sorted((trace_row(t, config.photo_dir) for t in day_traces(config)),
                  key=lambda r: (r["timestamp"], r["trace_id"]))
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(
        {"riskva.day": config.day.isoformat(), "riskva.experiment": config.experiment_name})
    path = Path(config.output_path)
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    versions = Counter(r["model_version"] for r in rows)
    parse_rate = sum(r["parse_ok"] for r in rows) / len(rows) if rows else None
    return InferenceLogResult(path=path, rows=len(rows), parse_rate=parse_rate, model_versions=dict(sorted(versions.items())),
                              sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def read_inference_log(path: str | Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid) as exc:
        raise RiskvaError(f"{path}: not a readable inference log ({exc})") from None
