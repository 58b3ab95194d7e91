"""Challenger → champion: the promotion rule, and the registry moves that carry it out.

Rule (``decide``), a non-inferiority test with three outcomes:
  1. the challenger must meet every absolute threshold (``Thresholds``: parse rate ≥ 0.9 and
     风险等级 accuracy above the majority-class baseline by default, so a useless model fails;
     severe recall and under-grading rate optional), else it is **rejected**;
  2. on each guarded metric (风险等级 accuracy, severe recall, parse rate) the 95% interval of
     (challenger − champion) on the same test photos is read three ways:
     - lower end above ``-margin``: non-inferior on that metric (shown);
     - upper end below 0: measured worse → **rejected** (that bound Bonferroni-corrected over the
       three metrics, so an equal challenger is called worse on some metric at most α of the time);
     - otherwise: this split cannot tell → **inconclusive**, the champion stays.
     The challenger carries the burden of proof on every metric, severe recall (the safety
     metric) included: too few photos (or no 严重 photo) is inconclusive, naming the photos needed.
  3. every guarded metric non-inferior → **promoted**.
With no champion yet, rule 1 alone decides.

The interval (evaluate/bootstrap.py): a paired bootstrap over the split's near-duplicate groups
(their photos are correlated; a photo without a group is its own), seeded, with one pseudo pair
won and one lost (the metrics are 0/1), so a handful of 严重 photos that never disagree shows
nothing. Its lower end is a one-sided test at α = 2.5 % (``ALPHA``): a challenger worse than the
margin is promoted at most that often (tests/registry/test_promotion_simulation.py simulates it).

Photos needed (``bootstrap.photos_needed``, ``Thresholds.power``, 80 % by default): n =
((z_{1−α} + z_{power}) · sd / (margin + min(Δ, 0)))² · deff, sd and the groups' design effect
measured on this split: at that n the decision is non-inferior with probability ``power``.
Every decision with a champion states the group count and the power.

The margin is the loss you accept for what else the new model brings (0.02 = two points), from
the cost of a wrong 风险等级, never raised until the split "passes". Equal models disagreeing on a
share d of photos need ≈ 2.80² · d · deff / margin² (d=0.2, deff 1: ≈3900 at 0.02, ≈630 at 0.05).

A merge that could not be verified (tag ``merge.verdict`` = ``unverifiable``) is said in the
decision: this evaluation is then the judge. Every decision is written to the version's tags
(``promotion.decision``, ``promotion.reason``, ``promotion.history`` ...); manual ``promote`` and
``rollback`` record their reason the same way.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import Any, Callable, Mapping, Sequence

from riskva_core.evaluate import bootstrap, metrics
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.metrics import as_level
from riskva_core.registry.client import ALIAS_CHALLENGER, ALIAS_CHAMPION, ALIAS_PREVIOUS, MAX_TAG_VALUE, Registry
from riskva_core.schema import FIELD_DESC, FIELD_LEVEL, LEVEL_INVALID, LEVELS, normalize_level

SEVERE = LEVELS[-1]
# The guarded metrics: the champion may not be shown worse than the margin on any of them.
COMPARED_METRICS: tuple[str, ...] = ("level_accuracy", "severe_recall", "parse_rate")
ALPHA = 0.025  # one-sided error of reading the lower end of a two-sided 95% interval
# "Measured worse" on any of the guarded metrics rejects: Bonferroni over them keeps an equal
# challenger's chance of being called worse on some metric at ALPHA, not 3 x ALPHA.
WORSE_ALPHA = ALPHA / len(COMPARED_METRICS)
MERGE_VERDICT_TAG = "merge.verdict"  # set on a registered version by the merge gate
MERGE_UNVERIFIABLE = "unverifiable"


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
    power: float = 0.8  # the chance that the photos_needed it names settle the margin


    def __post_init__(self) -> None:
        for name in ("min_parse_rate", "min_level_accuracy", "min_severe_recall", "max_under_grading_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RiskvaError(f"promotion threshold {name}={value}: must be within [0, 1]")
        if not 0.0 <= self.margin < 1.0:
            raise RiskvaError(f"promotion margin={self.margin}: must be within [0, 1)")
        if self.n_resamples < 100:
            raise RiskvaError(f"promotion n_resamples={self.n_resamples}: use at least 100")
        if not 0.5 <= self.power < 1.0:
            raise RiskvaError(f"promotion power={self.power}: must be within [0.5, 1)")


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
    notes: tuple[str, ...] = ()  # what the reader must know beside the outcome (an unverified merge)

    def __post_init__(self) -> None:
        if not self.outcome:
            object.__setattr__(self, "outcome", PROMOTED if self.promote else REJECTED)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "notes": list(self.notes), "failures": list(self.failures),
                "comparisons": {k: dict(v) for k, v in self.comparisons.items()}, "thresholds": dict(self.thresholds)}


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


def paired_evidence(diffs: Any, groups: Sequence[Any] | None, t: Thresholds) -> list[dict[str, Any]]:
    """The rule's interval for 0/1 paired differences (n photos x k columns sharing ``groups``):
    cluster bootstrap with the pseudo pairs the module docstring explains, plus the upper bound
    that reads "measured worse" (``WORSE_ALPHA``)."""
    return bootstrap.paired_bootstrap_batch(diffs, groups, t.n_resamples, t.seed, pseudo_pairs=True,
                                            upper_tail=WORSE_ALPHA)


def compare(
    challenger_predictions: Sequence[Mapping[str, Any]],
    champion_predictions: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = Thresholds(),
) -> dict[str, dict[str, Any]]:
    """Paired comparison on the photos both models answered (matched by sample id), resampling
    the near-duplicate groups the records carry (``group``, from the split; the challenger's
    record wins, a photo without one is its own group)."""
    chal, champ = per_sample_scores(challenger_predictions), per_sample_scores(champion_predictions)
    group = {str(p.get("id", i)): p.get("group") for preds in (champion_predictions, challenger_predictions)
             for i, p in enumerate(preds) if p.get("group") is not None}
    out: dict[str, dict[str, Any]] = {}
    for metric in COMPARED_METRICS:
        ids = sorted(set(chal[metric]) & set(champ[metric]))
        diffs = [chal[metric][i] - champ[metric][i] for i in ids]
        out[metric] = paired_evidence(diffs, [group.get(i) for i in ids], thresholds)[0]
        out[metric]["ungrouped"] = sum(1 for i in ids if group.get(i) is None)
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
    merge_verdict: str | None = None,
) -> Decision:
    """Apply the rule; ``comparisons``: ``compare(...)``, None with no champion; ``merge_verdict``:
    the challenger version's ``merge.verdict`` tag (``merge_verdict_of``)."""
    failures = absolute_failures(challenger_report, thresholds)
    read: dict[str, dict[str, Any]] = {}
    undecided: list[str] = []
    notes: list[str] = []
    if comparisons is not None:
        n_total = max([int((comparisons.get(m) or {}).get("n") or 0) for m in COMPARED_METRICS] + [0])
        for metric in COMPARED_METRICS:
            stats = read[metric] = assess(comparisons.get(metric) or {}, thresholds, n_total)
            text = _evidence_text(metric, stats, thresholds, champion_version)
            if stats["outcome"] == "worse":
                failures.append(text)
            elif stats["outcome"] in ("cannot_tell", "no_samples") and n_total:
                undecided.append(text)
        if n_total == 0:  # nothing paired at all: no evidence either way
            undecided.append("no test sample was answered by both models")
    if failures:
        outcome, reason = REJECTED, "kept as challenger: " + "; ".join(failures)
    elif undecided:
        outcome = INCONCLUSIVE
        reason = (f"inconclusive, champion v{champion_version} stays: this test split cannot show non-inferiority; "
                  + "; ".join(undecided))
    elif comparisons is None:
        outcome, reason = PROMOTED, "no champion yet; meets every absolute threshold"
    else:
        outcome = PROMOTED
        reason = (f"meets every threshold and is non-inferior to champion v{champion_version} "
                  f"(lower 95% bound of Δ above −{thresholds.margin:g} on {', '.join(COMPARED_METRICS)})")
    if comparisons is not None and read.get("level_accuracy", {}).get("n"):
        reason += "; " + _design_text(read["level_accuracy"], thresholds)
    if merge_verdict == MERGE_UNVERIFIABLE:
        notes.append("the merge could not be verified (merge gate verdict: unverifiable): this evaluation of the "
                     "merged model is the judge")
        reason += "; " + notes[-1]
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


def merge_verdict_of(registry: Registry, version: str) -> str | None:
    """The merge gate's verdict tag on a registered version (None when it carries none)."""
    return (registry.get_version(str(version)).tags or {}).get(MERGE_VERDICT_TAG)


def assess(stats: Mapping[str, Any], t: Thresholds, n_total: int) -> dict[str, Any]:
    """One guarded metric's evidence: outcome, smallest margin shown, photos needed.

    ``outcome``: non_inferior (lower end > −margin), worse (upper end < 0), cannot_tell (the
    interval straddles −margin; also a metric over part of the split, severe recall, on too few
    photos), no_samples (e.g. no 严重 photo in the split: nothing shown). ``n_needed``: paired
    photos of this metric for the interval to clear −margin with power ``t.power``
    (``bootstrap.photos_needed``; None when Δ ≤ −margin: no split size settles it, only a larger
    margin); ``photos_needed`` scales that to test photos by this metric's share of the split.
    """
    out = dict(stats)
    ci, n = stats.get("ci95"), int(stats.get("n") or 0)
    if ci is None or n == 0:
        out.update(outcome="no_samples", min_margin=None, n_needed=None, photos_needed=None, photos_now=n_total)
        return out
    lo, hi = float(ci[0]), float(ci[1])
    delta = float(stats["delta"]) if stats.get("delta") is not None else (lo + hi) / 2
    out["min_margin"] = round(max(0.0, -lo), 6)  # non-inferiority is shown at any margin above this
    # Spread of the paired differences, read back from the interval when not given (normal approximation).
    sd = float(stats["sd"]) if stats.get("sd") is not None else (hi - lo) / (2 * 1.959964) * n ** 0.5
    deff = float(stats.get("design_effect") or 1.0)
    needed = bootstrap.photos_needed(sd, t.margin + min(delta, 0.0), deff, t.power, ALPHA)
    out["n_needed"] = None if needed is None else max(n, needed)
    out["photos_now"] = max(n_total, n)
    out["photos_needed"] = None if needed is None else -(-out["n_needed"] * out["photos_now"] // n)
    out["power"] = t.power
    upper = stats.get("upper_tail_bound")
    out["outcome"] = ("non_inferior" if lo > -t.margin else
                      "worse" if (hi if upper is None else float(upper)) < 0 else "cannot_tell")
    return out


def _design_text(s: Mapping[str, Any], t: Thresholds) -> str:
    ungrouped = int(s.get("ungrouped") or 0)  # photos whose split recorded no group
    return (f"paired cluster bootstrap over {s.get('n_groups', s['n'])} near-duplicate groups of {s['n']} test photos"
            + (f" ({ungrouped} without a recorded group, each its own)" if ungrouped else "")
            + f", design effect {float(s.get('design_effect') or 1.0):.2f}, {t.n_resamples} resamples, seed {t.seed}; "
            f"photos needed at {t.power:.0%} power, one-sided α {ALPHA:.1%}")


def _evidence_text(metric: str, s: Mapping[str, Any], t: Thresholds, champion: str | None) -> str:
    unit = f"{SEVERE} test photos" if metric == "severe_recall" else "labelled test photos"
    if s["outcome"] == "no_samples":
        return (f"severe_recall: no {SEVERE} photo in the test split, so the challenger cannot show it is not worse "
                f"on {SEVERE}; label {SEVERE} test photos" if metric == "severe_recall" else f"{metric}: no paired samples")
    lo, hi = s["ci95"]
    head = (f"{metric} Δ={s['delta']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] on n={s['n']}"
            f"{' ' + SEVERE if metric == 'severe_recall' else ''} photos in {s.get('n_groups', s['n'])} groups")
    if s["outcome"] == "worse":
        upper = s.get("upper_tail_bound")
        return f"measured worse than champion v{champion} on {head}" + (
            "" if upper is None else f" (upper {1 - WORSE_ALPHA:.1%} bound {upper:+.3f})")
    if s["outcome"] == "non_inferior":
        return f"{head}: non-inferior"
    if s["n_needed"] is None:
        settle = f"no test split settles margin {t.margin:g} at this Δ; only a margin above {s['min_margin']:.3f} would"
    else:
        share = (f" (≈{s['photos_needed']} test photos in all at this split's share of {SEVERE})"
                 if metric == "severe_recall" else "")
        far = " — over 100× this split, as Δ sits almost at the margin —" if s["n_needed"] > 100 * s["n"] else ""
        settle = (f"≈{s['n_needed']} {unit} (now {s['n']}; ≈{s['n_needed'] - s['n']} more){share}{far} would show "
                  f"margin {t.margin:g} with {t.power:.0%} power, or a margin above {s['min_margin']:.3f} on this split")
    return f"{head} straddles −{t.margin:g}: {settle}"


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
    "merge_verdict_of",
    "paired_evidence",
    "per_sample_scores",
    "promote",
    "record",
    "rollback",
]
