from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from feedback_fixtures import closed_port, mlflow_env, traced_store  # noqa: F401 (fixtures)
from riskva_core.errors import RiskvaError
from riskva_core.feedback.inference_log import (InferenceLogConfig, day_window_ms, read_inference_log,
                                                write_inference_log)

DAY1, DAY2 = dt.date(2025, 3, 4), dt.date(2025, 3, 5)


def test_the_days_traces_become_one_row_each(traced_store, tmp_path):
    config = InferenceLogConfig(traced_store.tracking_uri, DAY1, tmp_path / "log" / "2025-03-04.parquet",
                                photo_dir=traced_store.photo_dir, page_size=2)  # several pages
    result = write_inference_log(config)
    assert result.rows == 5 and result.model_versions == {"1": 3, "2": 2}
    assert result.parse_rate == pytest.approx(4 / 5)
    frame = read_inference_log(result.path)
    assert list(frame["timestamp"]) == sorted(frame["timestamp"])  # ordered by time
    day1 = traced_store.answers[:5]
    assert list(frame["photo_sha256"]) == [hashlib.sha256(a.photo).hexdigest() for a in day1]
    assert list(frame["风险等级"]) == ["中等", "严重", "", "中等", "轻微"]
    assert list(frame["parse_ok"]) == [True, True, False, True, True]
    assert frame["level_confidence"].isna().tolist() == [False, False, True, False, False]
    assert frame.loc[0, "latency_s"] == pytest.approx(1.25)
    assert all(p and open(p, "rb").read() == a.photo for p, a in zip(frame["photo_path"], day1))
    # the same traces give the same bytes; the other day holds only its own
    again = write_inference_log(config)
    assert again.sha256 == result.sha256
    other = write_inference_log(InferenceLogConfig(traced_store.tracking_uri, DAY2, tmp_path / "d2.parquet"))
    assert other.rows == 2 and set(read_inference_log(other.path)["photo_path"]) == {""}


def test_a_day_without_traces_is_an_empty_table_and_a_down_store_one_line(traced_store, tmp_path, monkeypatch):
    empty = write_inference_log(InferenceLogConfig(traced_store.tracking_uri, dt.date(2024, 1, 1), tmp_path / "e.parquet"))
    assert empty.rows == 0 and empty.parse_rate is None and list(read_inference_log(empty.path).columns)[:2] == [
        "trace_id", "timestamp"]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's back-off would take minutes
    with pytest.raises(RiskvaError, match="reading the traces of 2024-01-01 failed"):
        write_inference_log(InferenceLogConfig(f"http://127.0.0.1:{closed_port()}", dt.date(2024, 1, 1),
                                               tmp_path / "down.parquet"))
    assert not (tmp_path / "down.parquet").exists()


def test_day_window_is_utc():
    start, end = day_window_ms(DAY1)
    assert start == 1_741_046_400_000 and end - start == 86_400_000
