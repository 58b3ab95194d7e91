"""Challenger → champion: the promotion rule, and the registry moves that carry it out.

Rule (``decide``), a non-inferiority test: the challenger becomes champion only if
  1. it meets every absolute threshold (``Thresholds``: parse rate ≥ 0.9 and 风险等级
     accuracy above the majority-class baseline by default, so a useless model fails;
     severe recall and under-grading rate optional), and
  2. on each guarded metric (风险等级 accuracy, severe recall, parse rate) the *lower*
     end of the paired-bootstrap 95% interval of (challenger − champion), on the same
     test samples, is above ``-margin`` (default 0.02). The burden of proof is on the
     challenger: "not shown to be worse by more than the margin" is required, so a
     small test split (wide intervals) keeps the champion rather than drifting down.
With no champion yet, rule 1 alone decides. The thresholds used are written into
the decision's tags (``promotion.thresholds``) so every decision can be re-checked.

Every decision, kept or not, is written to the version's tags
(``promotion.decision``, ``promotion.reason``, ``promotion.history`` ...), so the
registry shows why each version serves or does not. Manual ``promote`` and
``rollback`` record their reason the same way.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import Any, Callable, Mapping, Sequence

from riskva_core.evaluate import metrics
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.metrics import as_level
from riskva_core.registry.client import ALIAS_CHALLENGER, ALIAS_CHAMPION, ALIAS_PREVIOUS, MAX_TAG_VALUE, Registry
from riskva_core.schema import FIELD_DESC, FIELD_LEVEL, LEVEL_INVALID, LEVELS, normalize_level

SEVERE = LEVELS[-1]
# The guarded metrics: the champion may not be shown worse than the margin on any of them.
COMPARED_METRICS: tuple[str, ...] = ("level_accuracy", "severe_recall", "parse_rate")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    min_parse_rate: float = 0.9
    min_level_accuracy: float = 0.0
    # Accuracy must exceed always answering the test split's most frequent level.
    beat_majority_baseline: bool = True
    min_severe_recall: float = 0.0
    max_under_grading_rate: float = 1.0
    margin: float = 0.02  # non-inferiority margin for the paired comparison
    n_resamples: int = metrics.DEFAULT_RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("min_parse_rate", "min_level_accuracy", "min_severe_recall", "max_under_grading_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RiskvaError(f"promotion threshold {name}={value}: must be within [0, 1]")
        if not 0.0 <= self.margin < 1.0:
            raise RiskvaError(f"promotion margin={self.margin}: must be within [0, 1)")
        if self.n_resamples < 100:
            raise RiskvaError(f"promotion n_resamples={self.n_resamples}: use at least 100")


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    failures: tuple[str, ...] = ()
    comparisons: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    champion_version: str | None = None
    thresholds: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "failures": list(self.failures),
            "comparisons": {k: dict(v) for k, v in self.comparisons.items()},
            "champion_version": self.champion_version,
            "thresholds": dict(self.thresholds),
        }


# --- reading reports and predictions ----------------------------------------
def headline(report: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of an evaluation report.json: what the rule looks at, and what the
    model version shows (plus 缺陷描述's ROUGE-L: can the model say what it sees)."""
    level = report.get("risk_level") or {}
    desc = (report.get("text") or {}).get(FIELD_DESC) or {}
    return {
        "parse_rate": report.get("parse_rate"),
        "level_accuracy": level.get("accuracy"),
        "severe_recall": level.get("severe_recall"),
        "under_grading_rate": level.get("under_grading_rate"),
        "desc_rouge_l_char": desc.get("rouge_l_char"),
    }


def per_sample_scores(predictions: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per sample id: level correct (0/1) and parsed (0/1) for every sample; severe hit for
    gold-severe ones.

    Records are infer's: ``id``, ``parsed`` (fields), ``parse_ok``, ``ground_truth`` (fields),
    and ``error`` for a failed answer, which counts as level INVALID and unparsed (a miss).
    """
    level_correct: dict[str, float] = {}
    severe_hit: dict[str, float] = {}
    parsed_ok: dict[str, float] = {}
    for i, p in enumerate(predictions):
        sid = str(p.get("id", i))
        gt = p.get("ground_truth")
        gold = normalize_level(gt.get(FIELD_LEVEL)) if isinstance(gt, Mapping) else None
        if gold is None:
            raise RiskvaError(f"prediction {sid}: has no ground-truth {FIELD_LEVEL}; run inference on a labelled split")
        guess = LEVEL_INVALID if p.get("error") else as_level((p.get("parsed") or {}).get(FIELD_LEVEL))
        level_correct[sid] = float(guess == gold)
        parsed_ok[sid] = float(bool(p.get("parse_ok", guess != LEVEL_INVALID)) and not p.get("error"))
        if gold == SEVERE:
            severe_hit[sid] = float(guess == SEVERE)
    return {"level_accuracy": level_correct, "severe_recall": severe_hit, "parse_rate": parsed_ok}


def compare(
    challenger_predictions: Sequence[Mapping[str, Any]],
    champion_predictions: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = Thresholds(),
    bootstrap: Callable[..., Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Paired comparison on the samples both models answered (matched by sample id)."""
    boot = bootstrap or metrics.paired_bootstrap
    chal, champ = per_sample_scores(challenger_predictions), per_sample_scores(champion_predictions)
    out: dict[str, dict[str, Any]] = {}
    for metric in COMPARED_METRICS:
        ids = sorted(set(chal[metric]) & set(champ[metric]))
        if not ids:
            out[metric] = {"n": 0, "delta": None, "ci95": None, "p_value": None}
            continue
        stats = dict(boot([chal[metric][i] for i in ids], [champ[metric][i] for i in ids],
                          thresholds.n_resamples, thresholds.seed))
        stats["n"] = len(ids)
        out[metric] = stats
    return out


# --- the rule -----------------------------------------------------------------
def absolute_failures(report: Mapping[str, Any], t: Thresholds) -> list[str]:
    h = headline(report)
    failures = []

    def need(name: str, ok: Callable[[float], bool], text: str) -> None:
        value = h[name]
        if value is None:
            failures.append(f"{name} missing from the report")
        elif not ok(float(value)):
            failures.append(f"{name}={float(value):.3f} {text}")

    need("parse_rate", lambda v: v >= t.min_parse_rate, f"< {t.min_parse_rate}")
    need("level_accuracy", lambda v: v >= t.min_level_accuracy, f"< {t.min_level_accuracy}")
    if t.beat_majority_baseline:
        majority = ((report.get("baselines") or {}).get("majority") or {}).get("accuracy")
        if majority is None:
            failures.append("majority-baseline accuracy missing from the report")
        else:
            need("level_accuracy", lambda v: v > float(majority),
                 f"not above the majority-class baseline {float(majority):.3f}")
    if t.min_severe_recall > 0:
        need("severe_recall", lambda v: v >= t.min_severe_recall, f"< {t.min_severe_recall}")
    if t.max_under_grading_rate < 1:
        need("under_grading_rate", lambda v: v <= t.max_under_grading_rate, f"> {t.max_under_grading_rate}")
    return failures


def decide(
    challenger_report: Mapping[str, Any],
    comparisons: Mapping[str, Mapping[str, Any]] | None,
    thresholds: Thresholds = Thresholds(),
    champion_version: str | None = None,
) -> Decision:
    """Apply the rule; ``comparisons`` is ``compare(...)``'s result, or None with no champion."""
    failures = absolute_failures(challenger_report, thresholds)
    if comparisons is not None:
        failures += non_inferiority_failures(comparisons, thresholds.margin, champion_version)
    if failures:
        reason = "kept as challenger: " + "; ".join(failures)
    elif comparisons is None:
        reason = "no champion yet; meets every absolute threshold"
    else:
        reason = (f"meets every threshold and is non-inferior to champion v{champion_version} "
                  f"(lower 95% bound of Δ above −{thresholds.margin:g} on {', '.join(COMPARED_METRICS)})")
    return Decision(
        promote=not failures,
        reason=reason,
        failures=tuple(failures),
        comparisons={k: dict(v) for k, v in (comparisons or {}).items()},
        champion_version=champion_version,
        thresholds=dataclasses.asdict(thresholds),
    )


def non_inferiority_failures(comparisons: Mapping[str, Mapping[str, Any]], margin: float,
                             champion_version: str | None) -> list[str]:
    """One failure per guarded metric whose interval's lower end is not above ``-margin``.

    A metric with no paired samples cannot show non-inferiority, so it fails too: an
    unattended loop must not promote on evidence it does not have.
    """
    failures = []
    for metric in COMPARED_METRICS:
        stats = comparisons.get(metric) or {}
        ci = stats.get("ci95")
        if ci is None:
            failures.append(f"non-inferiority on {metric} not shown: no paired samples")
        elif not ci[0] > -margin:
            failures.append(
                f"not shown non-inferior to champion v{champion_version} on {metric}: "
                f"Δ={stats['delta']:+.3f}, 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}], lower end ≤ −{margin:g}"
            )
    return failures


# --- registry moves --------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _append_history(registry: Registry, version: str, entry: Mapping[str, Any]) -> str:
    current = registry.get_version(version).tags.get("promotion.history")
    history = json.loads(current) if current else []
    history.append(dict(entry))
    text = json.dumps(history, ensure_ascii=False, sort_keys=True)
    while len(text) > MAX_TAG_VALUE and len(history) > 1:  # keep the newest entries
        history.pop(0)
        text = json.dumps(history, ensure_ascii=False, sort_keys=True)
    return text


def record(registry: Registry, version: str, action: str, reason: str, extra: Mapping[str, Any] | None = None) -> None:
    """Write one decision onto a version's tags (latest decision + history)."""
    entry = {"at": _now(), "action": action, "reason": reason, **(extra or {})}
    tags = {
        "promotion.decision": action,
        "promotion.reason": reason,
        "promotion.decided_at": entry["at"],
        "promotion.history": _append_history(registry, version, entry),
    }
    for key, value in (extra or {}).items():
        tags[f"promotion.{key}"] = value
    registry.set_tags(version, tags)


def _make_champion(registry: Registry, version: str) -> str | None:
    old = registry.alias_version(ALIAS_CHAMPION)
    if old is not None and old != str(version):
        registry.set_alias(ALIAS_PREVIOUS, old)
    registry.set_alias(ALIAS_CHAMPION, str(version))
    return old


def apply_decision(registry: Registry, version: str, decision: Decision, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Record the decision on ``version``; move ``champion`` to it when it won. Returns aliases."""
    info = {"compared_to": decision.champion_version or "none", **(extra or {})}
    if decision.thresholds:
        info["thresholds"] = json.dumps(decision.thresholds, sort_keys=True)
    if decision.comparisons:
        info["comparison"] = json.dumps(decision.comparisons, sort_keys=True)
    if decision.promote:
        old = _make_champion(registry, version)
        record(registry, version, "promoted", decision.reason, info)
        if old is not None and old != str(version):
            record(registry, old, "replaced", f"replaced by v{version}: {decision.reason}", extra)
    else:
        record(registry, version, "rejected", decision.reason, info)
    return registry.aliases()


def promote(registry: Registry, version: str, reason: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Manual promotion (Launchpad ``promote_job``): thresholds are not re-applied, the reason is kept."""
    version = _existing(registry, version)
    if not reason.strip():
        raise RiskvaError("a manual promotion needs a reason")
    old = _make_champion(registry, version)
    record(registry, version, "promoted_manually", reason, extra)
    if old is not None and old != version:
        record(registry, old, "replaced", f"replaced by v{version} (manual): {reason}", extra)
    return registry.aliases()


def rollback(registry: Registry, reason: str, version: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Point ``champion`` back to ``version`` (default: the ``previous_champion``)."""
    if not reason.strip():
        raise RiskvaError("a rollback needs a reason")
    current = registry.alias_version(ALIAS_CHAMPION)
    target = version or registry.alias_version(ALIAS_PREVIOUS)
    if target is None:
        raise RiskvaError("rollback: no version given and no previous_champion to return to")
    target = _existing(registry, target)
    if current == target:
        raise RiskvaError(f"rollback: v{target} is already the champion")
    registry.set_alias(ALIAS_CHAMPION, target)
    if current is not None:
        registry.set_alias(ALIAS_PREVIOUS, current)
        record(registry, current, "rolled_back", f"rolled back to v{target}: {reason}", extra)
    record(registry, target, "restored", reason, {**(extra or {}), "replaced": current or "none"})
    return registry.aliases()


def _existing(registry: Registry, version: str) -> str:
    from mlflow.exceptions import MlflowException

    version = str(version).lstrip("v")
    try:
        registry.get_version(version)
    except MlflowException:
        raise RiskvaError(f"model {registry.model_name} has no version {version!r}") from None
    return version


__all__ = [
    "ALIAS_CHALLENGER",
    "Decision",
    "Thresholds",
    "absolute_failures",
    "apply_decision",
    "compare",
    "decide",
    "headline",
    "non_inferiority_failures",
    "per_sample_scores",
    "promote",
    "record",
    "rollback",
]
