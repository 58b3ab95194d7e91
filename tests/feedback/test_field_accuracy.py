from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from riskva_core.errors import RiskvaError
from riskva_core.feedback.field_accuracy import ALL, FieldAccuracyConfig, acceptance_interval, field_accuracy
from riskva_core.feedback.reviews import Review

DRAFT = {"风险": "墙面开裂", "风险等级": "中等", "纠正和预防建议": "修补", "缺陷描述": "裂缝"}


def coverage(n: int, grid: np.ndarray, method: str) -> list[float]:
    """Exact coverage at each true share p: the probability over k ~ Binomial(n, p) that the interval holds p."""
    intervals = [acceptance_interval(k, n, method=method) for k in range(n + 1)]
    return [sum(binom.pmf(k, n, p) for k, iv in enumerate(intervals) if iv.low <= p <= iv.high) for p in grid]


def test_intervals_cover_the_true_share():
    grid = np.linspace(0.05, 0.95, 19)
    for n in (15, 40):
        exact, wilson = coverage(n, grid, "exact"), coverage(n, grid, "wilson")
        assert min(exact) >= 0.95 - 1e-9  # Clopper-Pearson: at least nominal everywhere
        assert 0.93 <= float(np.mean(wilson)) <= 0.97  # Wilson: nominal on average
        assert min(wilson) >= 0.85


def test_edge_cases_none_and_all_accepted_and_no_reviews():
    for method in ("wilson", "exact"):
        none = acceptance_interval(0, 12, method=method)
        assert none.share == 0 and none.low == 0 and 0 < none.high < 0.4
        every = acceptance_interval(12, 12, method=method)
        assert every.share == 1 and every.high == pytest.approx(1.0) and 0.6 < every.low < 1
    empty = acceptance_interval(0, 0)
    assert empty.share is None and (empty.low, empty.high) == (0.0, 1.0)
    with pytest.raises(RiskvaError, match="interval method"):
        acceptance_interval(1, 2, method="wald")
    narrow, wide = acceptance_interval(30, 60), acceptance_interval(3, 6)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_shares_per_field_and_per_model_version():
    def review(version: str, **changes: str) -> Review:
        return Review("a" * 64, "", dict(DRAFT, **changes), dict(DRAFT), version, "li", "2025-03-04T10:00:00Z")

    reviews = [review("3"), review("3", 风险等级="严重"), review("3", 风险等级="轻微", 缺陷描述="裂缝很宽"),
               review("3", 风险="墙面开裂 "),  # whitespace only: accepted
               review("4")]
    result = field_accuracy(reviews, FieldAccuracyConfig(method="exact"))
    v3 = result.by_version["3"]
    assert (v3["风险等级"].accepted, v3["风险等级"].total) == (2, 4)
    assert (v3["缺陷描述"].accepted, v3["风险"].accepted, v3[ALL].accepted) == (3, 4, 2)
    assert v3[ALL].method == "exact" and v3[ALL].low < 0.5 < v3[ALL].high
    assert result.by_version["4"][ALL].share == 1.0
    metrics = result.metrics("3")
    assert metrics["field_accept.level"] == 0.5 and metrics["field_accept.reviews"] == 4
    assert metrics["field_accept.all.low"] == v3[ALL].low
