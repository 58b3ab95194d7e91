"""The champion's field accuracy: the share of its drafts inspectors accepted unchanged.

Per model version (the version that wrote the draft, not the one serving now) and per field, plus
``all`` (every field accepted: the draft needed no edit at all). "Unchanged" is the reviews'
rule (reviews.py: normalised text equal). Each share comes with a binomial confidence interval
from ``scipy.stats.binomtest(k, n).proportion_ci``:

- ``wilson`` (default): the score interval; close to nominal coverage on average and never
  outside [0, 1], the usual choice for a dashboard;
- ``exact``: Clopper-Pearson, at least the nominal coverage at every true share (conservative),
  for a claim that must hold.

Edge cases stay meaningful: 0 of n gives [0, u] and n of n gives [l, 1] with u, l strictly inside
(0, 1); no reviews gives no share and the whole [0, 1].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from riskva_core.errors import RiskvaError
from riskva_core.feedback.reviews import Review
from riskva_core.schema import FIELD_ADVICE, FIELD_DESC, FIELD_LEVEL, FIELD_RISK, FIELDS

ALL = "all"
METHODS = ("wilson", "exact")
# Metric names in ASCII (MLflow metric names, Prometheus-style dashboards).
METRIC_NAMES = {FIELD_RISK: "risk", FIELD_LEVEL: "level", FIELD_ADVICE: "advice", FIELD_DESC: "description", ALL: "all"}


@dataclasses.dataclass(frozen=True)
class Share:
    accepted: int
    total: int
    share: float | None  # None without reviews
    low: float
    high: float
    method: str
    confidence: float


def acceptance_interval(accepted: int, total: int, confidence: float = 0.95, method: str = "wilson") -> Share:
    from scipy.stats import binomtest

    if method not in METHODS:
        raise RiskvaError(f"interval method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0 < confidence < 1:
        raise RiskvaError(f"confidence must be within (0, 1), got {confidence}")
    if not 0 <= accepted <= total:
        raise ValueError(f"accepted ({accepted}) must be within [0, total ({total})]")
    if total == 0:
        return Share(0, 0, None, 0.0, 1.0, method, confidence)
    ci = binomtest(accepted, total).proportion_ci(confidence_level=confidence, method=method)
    return Share(accepted, total, accepted / total, float(ci.low), float(ci.high), method, confidence)


@dataclasses.dataclass(frozen=True)
class FieldAccuracyConfig:
    confidence: float = 0.95
    method: str = "wilson"


@dataclasses.dataclass
class FieldAccuracy:
    by_version: dict[str, dict[str, Share]]  # model version → field (or ``all``) → share

    def to_dict(self) -> dict[str, Any]:
        return {v: {f: dataclasses.asdict(s) for f, s in fields.items()} for v, fields in self.by_version.items()}

    def metrics(self, version: str) -> dict[str, float]:
        """One version's shares and bounds as flat MLflow metrics (``field_accept.<field>[.low|.high]``)."""
        shares = self.by_version.get(version, {})
        out: dict[str, float] = {"field_accept.reviews": float(shares[ALL].total if shares else 0)}
        for field, share in shares.items():
            name = f"field_accept.{METRIC_NAMES[field]}"
            if share.share is not None:
                out[name] = share.share
                out[f"{name}.low"], out[f"{name}.high"] = share.low, share.high
        return out


def field_accuracy(reviews: Sequence[Review], config: FieldAccuracyConfig = FieldAccuracyConfig()) -> FieldAccuracy:
    """Shares of drafts accepted unchanged, per version that wrote the draft and per field."""
    by_version: dict[str, list[list[str]]] = {}
    for review in reviews:
        by_version.setdefault(review.model_version or "unknown", []).append(review.changed_fields())
    result: dict[str, dict[str, Share]] = {}
    for version, changes in sorted(by_version.items()):
        n = len(changes)
        shares = {f: acceptance_interval(sum(1 for c in changes if f not in c), n, config.confidence, config.method)
                  for f in FIELDS}
        shares[ALL] = acceptance_interval(sum(1 for c in changes if not c), n, config.confidence, config.method)
        result[version] = shares
    return FieldAccuracy(result)
