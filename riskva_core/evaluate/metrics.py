"""Scores for predicted risk reports: level classification, text overlap, bootstrap intervals.

Decisions (also written into every report under ``definitions``):

- Predicted level: one of 轻微/中等/严重, or ``INVALID`` for a missing, unreadable or
  failed answer. INVALID always counts against the model:
  * accuracy: wrong;
  * macro-F1 / per-class precision & recall: averaged over the three real levels; an
    INVALID prediction is a miss (lowers recall) of its true class;
  * confusion matrix: label order 轻微, 中等, 严重, INVALID (INVALID row stays empty,
    ground truth is validated);
  * QWK: INVALID is scored as the level farthest from the truth (轻微→严重, 中等→轻微,
    严重→轻微), so emitting garbage can never raise the kappa;
  * under-grading: a predicted level below the truth, and every INVALID (a report with no
    readable level does not flag the risk, which is what under-grading costs on site).
- Text (风险, 纠正和预防建议, 缺陷描述):
  * ``rouge_l_char``: character-level ROUGE-L F1 in [0, 1] after NFKC, whitespace dropped,
    LCS from rouge-chinese (raw overlap counts, so identical strings give exactly 1.0);
  * ``bleu4_char``, ``rouge1_jieba``, ``rouge2_jieba``, ``rouge_l_jieba``: exactly
    LLaMA-Factory's ``ComputeSimilarity`` / ``scripts/eval_bleu_rouge.py`` (nltk sentence_bleu
    on character lists with SmoothingFunction().method3; rouge-chinese ``Rouge().get_scores``
    on jieba words joined by spaces; x100, rounded to 4 places, averaged per sample);
  * a missing field is scored as the empty string, and empty text scores 0.
- Bootstrap (evaluate/bootstrap.py): percentile intervals from ``n_resamples`` resamples drawn
  with ``numpy.random.default_rng(seed)``, resampling the split's near-duplicate groups (a record's
  ``group``; a photo without one is its own group), not photos: photos of one group are answered
  alike and are not independent evidence. A resample where a statistic is undefined (e.g. no 严重
  sample) is dropped. Paired bootstrap resamples the same groups for both systems; its p-value is
  two-sided: 2 x min share of resampled deltas on either side of zero, with +1 smoothing, capped at 1.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

# The bootstrap lives in bootstrap.py; its names stay importable from here, where reports always found them.
from riskva_core.evaluate.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_ci, paired_bootstrap  # noqa: F401
from riskva_core.schema import LEVEL_INVALID, LEVEL_RANK, LEVELS, TEXT_FIELDS, normalize_level, normalize_text

CONFUSION_LABELS: tuple[str, ...] = (*LEVELS, LEVEL_INVALID)
TEXT_METRICS: tuple[str, ...] = ("rouge_l_char", "bleu4_char", "rouge1_jieba", "rouge2_jieba", "rouge_l_jieba")

DEFINITIONS = {
    "invalid_level": "missing, unreadable or failed answers are predicted level INVALID",
    "accuracy": "share of samples whose predicted level equals the truth; INVALID is wrong",
    "macro_f1": "mean F1 over 轻微/中等/严重; an INVALID prediction is a miss of its true class",
    "qwk": "quadratic-weighted Cohen kappa (sklearn); INVALID scored as the level farthest from the truth",
    "severe_recall": "recall of 严重; null when the truth has no 严重",
    "under_grading_rate": "share of samples predicted below the truth, INVALID included",
    "rouge_l_char": "character ROUGE-L F1 in [0,1] after NFKC, whitespace removed (rouge-chinese LCS)",
    "bleu4_char": "LLaMA-Factory: nltk sentence_bleu on characters, SmoothingFunction().method3, x100",
    "rouge_jieba": "LLaMA-Factory: rouge-chinese F on jieba words, x100",
    "missing_text": "a missing field is scored as empty text, and empty text scores 0",
    "ci95": "percentile cluster bootstrap over the split's near-duplicate groups (a photo without a group is "
            "its own group), numpy default_rng(seed)",
    "paired_p_value": "two-sided paired bootstrap: 2 x min share of deltas <=0 / >=0, +1 smoothing, capped at 1",
}


# ---------------------------------------------------------------- level metrics

def as_level(value: object) -> str:
    """A prediction's level: canonical level or INVALID (missing or unrecognised)."""
    return normalize_level(value) or LEVEL_INVALID


def _qwk_pred(true: str, pred: str) -> str:
    if pred != LEVEL_INVALID:
        return pred
    rank = LEVEL_RANK[true]
    # Farthest level from the truth; for the middle level both ends are 1 away and the
    # lower one is chosen (INVALID is treated as under-grading throughout).
    return LEVELS[-1] if rank == 0 else LEVELS[0]


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    if not y_true:
        return None
    return float(np.mean([t == p for t, p in zip(y_true, y_pred)]))


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    from sklearn.metrics import f1_score

    if not y_true:
        return None
    return float(f1_score(y_true, y_pred, labels=list(LEVELS), average="macro", zero_division=0))


def macro_f1_codes(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``macro_f1`` on integer codes (index in CONFUSION_LABELS), for bootstrap loops.

    sklearn's f1_score costs milliseconds per call in input validation; a thousand
    resamples of it dominate a report. This computes the same numbers from one
    bincount (tests check it against sklearn).
    """
    k = len(CONFUSION_LABELS)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)[: len(LEVELS), : len(LEVELS)]
    tp = np.diag(cm).astype(float)
    pred_n = np.bincount(y_pred, minlength=k)[: len(LEVELS)]
    true_n = np.bincount(y_true, minlength=k)[: len(LEVELS)]
    denom = pred_n + true_n  # F1 = 2TP / (predicted + actual); 0 where both are 0 (zero_division=0)
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(LEVELS)), where=denom > 0)
    return float(f1.mean())


def qwk(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    """Quadratic-weighted kappa; None when undefined (e.g. one class on both sides)."""
    from sklearn.metrics import cohen_kappa_score

    if not y_true:
        return None
    mapped = [_qwk_pred(t, p) for t, p in zip(y_true, y_pred)]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        k = cohen_kappa_score(y_true, mapped, labels=list(LEVELS), weights="quadratic")
    return _finite(float(k))


def severe_recall(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    severe = LEVELS[-1]
    hits = [p == severe for t, p in zip(y_true, y_pred) if t == severe]
    return float(np.mean(hits)) if hits else None


def under_graded(true: str, pred: str) -> bool:
    return pred == LEVEL_INVALID or LEVEL_RANK[pred] < LEVEL_RANK[true]


def under_grading_rate(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    if not y_true:
        return None
    return float(np.mean([under_graded(t, p) for t, p in zip(y_true, y_pred)]))


def level_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict:
    """All level scores; ``y_true`` must hold canonical levels, ``y_pred`` levels or INVALID."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = list(y_true), [as_level(p) for p in y_pred]
    bad = sorted({t for t in y_true if t not in LEVEL_RANK})
    if bad:
        raise ValueError(f"ground-truth levels must be one of {LEVELS}, got {bad}")
    out: dict = {
        "n": len(y_true),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "qwk": qwk(y_true, y_pred),
        "severe_recall": severe_recall(y_true, y_pred),
        "under_grading_rate": under_grading_rate(y_true, y_pred),
        "invalid_rate": float(np.mean([p == LEVEL_INVALID for p in y_pred])) if y_pred else None,
        "labels": list(CONFUSION_LABELS),
    }
    if y_true:
        p, r, f, s = precision_recall_fscore_support(
            y_true, y_pred, labels=list(LEVELS), zero_division=0
        )
        out["per_class"] = {
            lvl: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, lvl in enumerate(LEVELS)
        }
        out["confusion"] = confusion_matrix(y_true, y_pred, labels=list(CONFUSION_LABELS)).tolist()
    else:
        out["per_class"] = {lvl: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for lvl in LEVELS}
        out["confusion"] = [[0] * len(CONFUSION_LABELS) for _ in CONFUSION_LABELS]
    return out


def majority_level(y_true: Iterable[str]) -> str:
    """The most frequent true level; ties go to the milder level (deterministic)."""
    counts = Counter(y_true)
    if not counts:
        raise ValueError("no ground truth to take a majority from")
    return min(counts, key=lambda lvl: (-counts[lvl], LEVEL_RANK.get(lvl, len(LEVELS))))


def majority_baseline(y_true: Sequence[str]) -> dict:
    """Level metrics of always predicting the majority true level."""
    lvl = majority_level(y_true)
    return {"level": lvl, **level_metrics(y_true, [lvl] * len(y_true))}


# ---------------------------------------------------------------- text metrics

_JIEBA_READY = False


def _jieba():
    global _JIEBA_READY
    import jieba

    if not _JIEBA_READY:
        jieba.setLogLevel(logging.CRITICAL)
        jieba.initialize()
        _JIEBA_READY = True
    return jieba


def rouge_l_char(pred: str | None, ref: str | None) -> float:
    """Character-level ROUGE-L F1 in [0, 1]; 0 when either side is empty."""
    from rouge_chinese import Rouge

    hyp = [c for c in normalize_text(pred or "") if not c.isspace()]
    gold = [c for c in normalize_text(ref or "") if not c.isspace()]
    if not hyp or not gold:
        return 0.0
    # raw_results gives the LCS length itself; rouge-chinese's own F adds 1e-8 to the
    # denominator, which would keep identical strings just below 1.0.
    raw = Rouge(metrics=["rouge-l"], raw_results=True).get_scores(" ".join(hyp), " ".join(gold))[0]["rouge-l"]
    return 2.0 * raw["overlap"] / (raw["hyp"] + raw["ref"])


def llamafactory_scores(pred: str | None, ref: str | None) -> dict[str, float]:
    """bleu4_char and rouge-{1,2,l} on jieba words, exactly as LLaMA-Factory computes them (x100)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred, ref = pred or "", ref or ""
    jieba = _jieba()
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(ref))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    if pred and ref:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns on every zero n-gram overlap
            bleu = sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3)
    else:
        bleu = 0.0
    return {
        "bleu4_char": round(bleu * 100, 4),
        "rouge1_jieba": round(result["rouge-1"]["f"] * 100, 4),
        "rouge2_jieba": round(result["rouge-2"]["f"] * 100, 4),
        "rouge_l_jieba": round(result["rouge-l"]["f"] * 100, 4),
    }


def text_scores(pred: str | None, ref: str | None) -> dict[str, float]:
    """Every text metric for one (prediction, reference) pair."""
    return {"rouge_l_char": rouge_l_char(pred, ref), **llamafactory_scores(pred, ref)}


# ---------------------------------------------------------------- per-sample scores

def sample_scores(pred_fields: Mapping[str, str | None], true_fields: Mapping[str, str]) -> dict:
    """Per-sample scores: level hit, text metrics per field, and their field means."""
    true_level = normalize_level(true_fields.get("风险等级"))
    pred_level = as_level(pred_fields.get("风险等级"))
    per_field = {f: text_scores(pred_fields.get(f), true_fields.get(f)) for f in TEXT_FIELDS}
    mean = {m: float(np.mean([per_field[f][m] for f in TEXT_FIELDS])) for m in TEXT_METRICS}
    return {
        "true_level": true_level,
        "pred_level": pred_level,
        "level_correct": float(pred_level == true_level),
        "fields": per_field,
        "mean": mean,
    }


def prediction_scores(entry: Mapping) -> dict:
    """Per-sample scores of one prediction record (as written by infer) with ground truth.

    A record with ``error`` counts as a failure: no fields, level INVALID.
    """
    gt = entry.get("ground_truth")
    if not isinstance(gt, Mapping):
        raise ValueError(f"prediction {entry.get('id')!r} has no ground_truth")
    parsed = {} if entry.get("error") else (entry.get("parsed") or {})
    return sample_scores(parsed, gt)


def scores_by_id(predictions: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """{id: {"level_correct", "rouge_l_char"}}: the paired quantities model comparison uses."""
    out: dict[str, dict[str, float]] = {}
    for entry in predictions:
        s = prediction_scores(entry)
        out[str(entry["id"])] = {"level_correct": s["level_correct"], "rouge_l_char": s["mean"]["rouge_l_char"]}
    return out


# ---------------------------------------------------------------- paired comparison

def compare_predictions(
    a: Sequence[Mapping],
    b: Sequence[Mapping],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Paired comparison of two prediction sets matched by ``id`` (a is the candidate)."""
    sa, sb = scores_by_id(a), scores_by_id(b)
    ids = sorted(set(sa) & set(sb))
    group = {str(r["id"]): r.get("group") for r in (*b, *a) if r.get("group") is not None}  # a's wins
    out: dict = {"n_matched": len(ids), "n_only_a": len(set(sa) - set(sb)), "n_only_b": len(set(sb) - set(sa))}
    for metric in ("level_correct", "rouge_l_char"):
        key = "accuracy" if metric == "level_correct" else "rouge_l_char"
        out[key] = paired_bootstrap([sa[i][metric] for i in ids], [sb[i][metric] for i in ids], n_resamples, seed,
                                    groups=[group.get(i) for i in ids])
    return out
