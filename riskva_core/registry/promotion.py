"""Challenger → champion: the promotion rule, and the registry moves that carry it out.

Rule (``decide``), a non-inferiority test with three outcomes:
  1. the challenger must meet every absolute threshold (``Thresholds``: parse rate ≥ 0.9 and
     风险等级 accuracy above the majority-class baseline by default, so a useless model fails;
     severe recall and under-grading rate optional), else it is **rejected**;
  2. on each guarded metric (风险等级 accuracy, severe recall, parse rate) the paired-bootstrap
     95% interval of (challenger − champion) on the same test samples is read three ways:
     - lower end above ``-margin``: non-inferior on that metric;
     - upper end below 0: measured worse → **rejected**;
     - otherwise the interval straddles ``-margin``: this split cannot tell.
     When a guarded metric cannot tell, the decision is **inconclusive**: the champion stays and
     the reason names how many labelled test photos would settle it at this margin (from the
     observed Δ and spread: n ≈ (1.96·sd / (Δ + margin))²) or the smallest margin this split
     could show (−lower end). A metric over a subset of the split with fewer than ``min_samples``
     paired samples (severe recall on a demo-sized split has ~30) says so and does not block; a
     measured-worse result on it still rejects.
  3. every guarded metric non-inferior (or small-sample and not worse) → **promoted**.
With no champion yet, rule 1 alone decides. Each decision records, per guarded metric, the
interval, the outcome, the smallest margin this split could show non-inferiority at and the
photos needed (``Decision.comparisons``), and the thresholds used (``promotion.thresholds``).

Choosing the margin: it is the largest loss on a guarded metric you accept in exchange for
whatever else the new model brings (newer data, fixed rare cases), in the metric's units
(0.02 = two points of accuracy). Pick it from the cost of a wrong 风险等级, not from the test
split: a margin raised until the split "passes" proves nothing. Then size the test split for
it: at a disagreement rate d between the two models, an equal challenger needs about
(1.96² · d) / margin² labelled test photos (d=0.2, margin 0.02: ≈1900; margin 0.05: ≈300).
An inconclusive decision tells you both numbers for your split.

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
    # Below this many paired samples a guarded metric that cannot tell does not block (it says so).
    min_samples: int = 100

    def __post_init__(self) -> None:
        for name in ("min_parse_rate", "min_level_accuracy", "min_severe_recall", "max_under_grading_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RiskvaError(f"promotion threshold {name}={value}: must be within [0, 1]")
        if not 0.0 <= self.margin < 1.0:
            raise RiskvaError(f"promotion margin={self.margin}: must be within [0, 1)")
        if self.n_resamples < 100:
            raise RiskvaError(f"promotion n_resamples={self.n_resamples}: use at least 100")
        if self.min_samples < 1:
            raise RiskvaError(f"promotion min_samples={self.min_samples}: must be at least 1")


PROMOTED, REJECTED, INCONCLUSIVE = "promoted", "rejected", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    failures: tuple[str, ...] = ()
    comparisons: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    champion_version: str | None = None
    thresholds: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    outcome: str = ""  # promoted / rejected / inconclusive (derived from ``promote`` when empty)
    notes: tuple[str, ...] = ()  # small-sample metrics that did not block, and why

    def __post_init__(self) -> None:
        if not self.outcome:
            object.__setattr__(self, "outcome", PROMOTED if self.promote else REJECTED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "notes": list(self.notes),
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
    read: dict[str, dict[str, Any]] = {}
    undecided: list[str] = []
    notes: list[str] = []
    if comparisons is not None:
        n_total = max([int((comparisons.get(m) or {}).get("n") or 0) for m in COMPARED_METRICS] + [0])
        for metric in COMPARED_METRICS:
            stats = read[metric] = assess(comparisons.get(metric) or {}, thresholds, n_total)
            text = _evidence_text(metric, stats, thresholds.margin, champion_version)
            if stats["outcome"] == "worse":
                failures.append(text)
            elif stats["outcome"] == "cannot_tell":
                undecided.append(text)
            elif stats["outcome"] in ("too_few", "no_samples"):
                notes.append(text)
        if n_total == 0:  # nothing paired at all: no evidence either way
            undecided.append("no test sample was answered by both models")
    if failures:
        outcome, reason = REJECTED, "kept as challenger: " + "; ".join(failures)
    elif undecided:
        outcome = INCONCLUSIVE
        reason = (f"inconclusive, champion v{champion_version} stays: this test split cannot tell; "
                  + "; ".join(undecided))
    elif comparisons is None:
        outcome, reason = PROMOTED, "no champion yet; meets every absolute threshold"
    else:
        outcome = PROMOTED
        reason = (f"meets every threshold and is non-inferior to champion v{champion_version} "
                  f"(lower 95% bound of Δ above −{thresholds.margin:g} on "
                  f"{', '.join(m for m in COMPARED_METRICS if read[m]['outcome'] == 'non_inferior')})")
    if notes:
        reason += "; not deciding (too few samples): " + "; ".join(notes)
    return Decision(
        promote=outcome == PROMOTED,
        reason=reason,
        failures=tuple(failures + undecided),
        comparisons=read if comparisons is not None else {},
        champion_version=champion_version,
        thresholds=dataclasses.asdict(thresholds),
        outcome=outcome,
        notes=tuple(notes),
    )


Z95 = 1.959964


def assess(stats: Mapping[str, Any], t: Thresholds, n_total: int) -> dict[str, Any]:
    """One guarded metric's evidence: outcome, smallest margin shown, samples needed.

    ``outcome``: non_inferior (lower end > −margin), worse (upper end < 0), cannot_tell (the
    interval straddles −margin), too_few (cannot tell with fewer than ``t.min_samples`` pairs, on a
    metric over a subset of the split such as severe recall),
    no_samples. ``n_needed``: paired samples for the interval to clear −margin at the observed Δ
    and spread (None when Δ ≤ −margin: no split size settles it, only a larger margin);
    ``photos_needed`` scales that to test photos by this metric's share of the split.
    """
    out = dict(stats)
    ci, n = stats.get("ci95"), int(stats.get("n") or 0)
    if ci is None or n == 0:
        out.update(outcome="no_samples", min_margin=None, n_needed=None, photos_needed=None)
        return out
    lo, hi = float(ci[0]), float(ci[1])
    delta = float(stats["delta"]) if stats.get("delta") is not None else (lo + hi) / 2
    out["min_margin"] = round(max(0.0, -lo), 6)  # non-inferiority is shown at any margin above this
    # Spread of the paired differences, read back from the interval (normal approximation).
    sd = float(stats.get("sd") or (hi - lo) / (2 * Z95) * n ** 0.5)
    gap = delta + t.margin
    needed = None if gap <= 0 else max(n, int(-(-(Z95 * sd / gap) ** 2 // 1)))
    out["n_needed"] = needed
    out["photos_now"] = max(n_total, n)
    out["photos_needed"] = None if needed is None else int(-(-needed * out["photos_now"] // n))
    if lo > -t.margin:
        out["outcome"] = "non_inferior"
    elif hi < 0:
        out["outcome"] = "worse"
    else:
        # Only a metric on a subset of the split (severe recall) can be "too few": the whole-split
        # metrics are the evidence this split has, and an undecided one keeps the champion.
        out["outcome"] = "too_few" if n < min(t.min_samples, n_total) else "cannot_tell"
    return out


def _evidence_text(metric: str, s: Mapping[str, Any], margin: float, champion: str | None) -> str:
    if s["outcome"] == "no_samples":
        return f"{metric}: no paired samples"
    lo, hi = s["ci95"]
    head = f"{metric} Δ={s['delta']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] on n={s['n']}"
    if s["outcome"] == "worse":
        return f"measured worse than champion v{champion} on {head}"
    if s["outcome"] == "non_inferior":
        return f"{head}: non-inferior"
    if s["n_needed"] is not None and s["photos_needed"] > 100 * s["photos_now"]:
        settle = (f"Δ sits almost at −{margin:g}: no practical test split settles it (over 100× this one); "
                  f"a margin above {s['min_margin']:.3f} would")
    elif s["n_needed"] is None:
        settle = f"no test split settles margin {margin:g} at this Δ; only a margin above {s['min_margin']:.3f} would"
    else:
        settle = (f"≈{s['photos_needed']} labelled test photos (now {s['photos_now']}; "
                  f"≈{s['photos_needed'] - s['photos_now']} more) would settle margin {margin:g}, "
                  f"or a margin above {s['min_margin']:.3f} on this split")
    return f"{head} straddles −{margin:g}: {settle}"


def non_inferiority_failures(comparisons: Mapping[str, Mapping[str, Any]], margin: float,
                             champion_version: str | None) -> list[str]:
    """The reasons a challenger is not promoted on the paired comparison (worse, or cannot tell)."""
    d = decide({"parse_rate": 1.0, "risk_level": {"accuracy": 1.0}}, comparisons,
               Thresholds(margin=margin, beat_majority_baseline=False), champion_version)
    return list(d.failures)


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
        record(registry, version, decision.outcome, decision.reason, info)
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
