"""Cluster bootstrap over the split's near-duplicate groups, and the sample size a comparison needs.

Why clusters: prepare keeps whole near-duplicate groups (re-exports, bursts of one defect) in one
split, so the photos of a test group are answered alike by a model and are not independent
evidence. Resampling photos as if they were counts one defect several times and gives intervals
too narrow by about the square root of the design effect. Here the unit of resampling is the
group: each resample draws as many groups as the sample has, with replacement, and a statistic
is computed on the photos of the drawn groups (a mean becomes the ratio of the drawn groups'
sums to their photo counts). A photo without a recorded group is its own group, so ungrouped
data gives the ordinary photo bootstrap (the same draws as before groups existed).

Draws: ``numpy.random.default_rng(seed)``; the (resample x group) draw matrix depends only on
(seed, number of groups, n_resamples), so the same groups always get the same draws.
Intervals are percentile intervals (2.5 %, 97.5 %); the paired p-value is two-sided: 2 x the
smaller share of resampled deltas on either side of zero, +1 smoothing, capped at 1.

Design effect: the variance of the mean under the groups over its variance were the photos
independent, ``deff = V_cluster / (sd^2 / n)`` with the cluster-robust (CR1) variance
``V_cluster = G/(G-1) * sum_g (S_g - N_g * mean)^2 / n^2`` (S_g, N_g: a group's sum and photo
count). It is floored at 1 when it plans a sample size (a negative within-group correlation
measured on a small split is noise, not a promise).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
_CHUNK = 200  # resamples drawn at once: memory ~ _CHUNK x groups x 8 bytes


def group_codes(groups: Sequence[Hashable | None] | None, n: int) -> np.ndarray:
    """Group index 0..G-1 per photo, in order of first appearance; None (or no groups) = own group."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} group ids for {n} samples")
    codes: dict[Hashable, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, g in enumerate(groups):
        key = ("photo", i) if g is None else ("group", str(g))
        out[i] = codes.setdefault(key, len(codes))
    return out


def _draw_chunks(n_groups: int, n_resamples: int, seed: int):
    """Resampled group indices, (rows, n_groups) at a time, from one seeded stream."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, _CHUNK):
        yield rng.integers(0, n_groups, size=(min(_CHUNK, n_resamples - start), n_groups))


def _counts(draws: np.ndarray, n_groups: int) -> np.ndarray:
    """How often each group was drawn, per resample row."""
    rows = draws.shape[0]
    flat = (draws + np.arange(rows)[:, None] * n_groups).ravel()
    return np.bincount(flat, minlength=rows * n_groups).reshape(rows, n_groups).astype(float)


def bootstrap_ci(
    n: int,
    statistic: Callable[[np.ndarray], float | None],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    groups: Sequence[Hashable | None] | None = None,
) -> list[float] | None:
    """95% percentile interval of ``statistic(indices)`` over cluster-resampled photo indices.

    A resample where the statistic is undefined (None or NaN, e.g. no 严重 photo drawn) is dropped.
    """
    if n == 0:
        return None
    codes = group_codes(groups, n)
    order = np.argsort(codes, kind="stable")  # photos of one group side by side
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    values = []
    for draws in _draw_chunks(len(sizes), n_resamples, seed):
        for row in draws:
            size = sizes[row]
            # positions of the drawn groups' photos: each group's start, then 0..size-1 within it
            offsets = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
            v = statistic(order[np.repeat(starts[row], size) + offsets])
            if v is not None and not math.isnan(v):
                values.append(v)
    if not values:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_bootstrap_batch(
    diffs: np.ndarray,
    groups: Sequence[Hashable | None] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    pseudo_pairs: bool = False,
    upper_tail: float | None = None,
) -> list[dict]:
    """Cluster bootstrap of the mean of each column of paired differences ``diffs`` (n x k).

    The columns share one group structure and one set of draws (k outcomes of one test split,
    e.g. several metrics, or simulated replicates). Per column: ``delta`` (mean difference),
    ``ci95``, ``p_value``, ``n``, ``n_groups``, ``sd`` (per-photo sd of the differences) and
    ``design_effect``; with ``upper_tail``, also ``upper_tail_bound``: the resampled deltas'
    (1 - upper_tail) quantile (a one-sided bound at another level from the same draws).

    ``pseudo_pairs`` (for 0/1 outcomes, differences in {-1, 0, 1}): the interval, sd and p-value
    are computed with one extra pair the challenger wins (+1) and one it loses (-1), each its
    own group, as Agresti-Caffo / Agresti-Min add pseudo-counts to proportions. Without them a
    sample where the two models never disagree gives the interval [0, 0] however small it is:
    5 severe photos would "show" non-inferiority. With them, n pairs without a disagreement give
    a lower end near -3/n, close to the exact one-sided 97.5 % bound -ln(40)/n = -3.7/n on the
    share of photos the challenger loses. ``delta`` stays the observed mean.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[:, None] if d.ndim == 1 else d
    n, k = d.shape
    if n == 0:
        return [{"delta": None, "ci95": None, "p_value": None, "n": 0, "n_groups": 0, "sd": None,
                 "design_effect": None, **({"upper_tail_bound": None} if upper_tail else {})} for _ in range(k)]
    codes = group_codes(groups, n)
    n_groups = int(codes.max()) + 1
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=n_groups).astype(float)
    sums = np.add.reduceat(d[order], np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), axis=0)
    delta = d.mean(axis=0)
    sd_raw = d.std(axis=0, ddof=1) if n > 1 else np.zeros(k)
    resid = sums - sizes[:, None] * delta
    v_cluster = (n_groups / (n_groups - 1) if n_groups > 1 else 1.0) * (resid ** 2).sum(axis=0) / n ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        deff = np.where(sd_raw > 0, v_cluster / (sd_raw ** 2 / n), 1.0)
    if pseudo_pairs:
        sums = np.vstack([sums, np.ones((1, k)), -np.ones((1, k))])
        sizes = np.concatenate([sizes, [1.0, 1.0]])
        aug = np.vstack([d, np.ones((1, k)), -np.ones((1, k))])
        sd = aug.std(axis=0, ddof=1)
    else:
        sd = sd_raw
    deltas = np.concatenate([(c @ sums) / (c @ sizes)[:, None]
                             for c in (_counts(dr, len(sizes)) for dr in _draw_chunks(len(sizes), n_resamples, seed))])
    lo, hi = np.percentile(deltas, [2.5, 97.5], axis=0)
    le = ((deltas <= 0).sum(axis=0) + 1) / (n_resamples + 1)
    ge = ((deltas >= 0).sum(axis=0) + 1) / (n_resamples + 1)
    tail = np.percentile(deltas, 100 * (1 - upper_tail), axis=0) if upper_tail else None
    return [{"delta": float(delta[j]), "ci95": [float(lo[j]), float(hi[j])],
             "p_value": float(min(1.0, 2 * min(le[j], ge[j]))), "n": int(n), "n_groups": n_groups,
             "sd": float(sd[j]), "design_effect": float(deff[j]),
             **({"upper_tail_bound": float(tail[j])} if tail is not None else {})} for j in range(k)]


def paired_bootstrap(
    a_scores: Sequence[float],
    b_scores: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    groups: Sequence[Hashable | None] | None = None,
    pseudo_pairs: bool = False,
) -> dict:
    """Mean difference a - b of paired per-photo scores, its 95% CI and a two-sided p-value,
    resampling the near-duplicate ``groups`` (one id per pair; None = its own group)."""
    a, b = np.asarray(a_scores, dtype=float), np.asarray(b_scores, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have equal length, got {a.size} and {b.size}")
    return paired_bootstrap_batch(a - b, groups, n_resamples, seed, pseudo_pairs)[0]


def photos_needed(sd: float, gap: float, design_effect: float = 1.0, power: float = 0.8,
                  alpha: float = 0.025) -> int | None:
    """Paired samples for a one-sided non-inferiority test at ``alpha`` to succeed with ``power``.

        n = ceil( ((z_{1-alpha} + z_{power}) * sd / gap)^2 * max(1, design_effect) )

    ``gap``: how far the expected difference sits above the non-inferiority bound, margin + Δ
    (callers plan with Δ = min(observed Δ, 0): a lucky positive Δ is not counted on). ``sd``:
    the per-photo sd of the paired differences; ``design_effect`` scales photos for groups of
    correlated photos. Why: the lower end of the interval is about Δ̂ - z_{1-alpha} * se with
    se = sd * sqrt(deff / n); it clears -margin when Δ̂ > -margin + z_{1-alpha} * se, which at
    this n happens with probability Φ(gap / se - z_{1-alpha}) = Φ(z_{power}) = ``power``.
    None when ``gap`` <= 0: no sample size settles it, only a larger margin.
    """
    if not 0 < power < 1 or not 0 < alpha < 0.5:
        raise ValueError(f"power={power} must be in (0, 1) and alpha={alpha} in (0, 0.5)")
    if gap <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(power)
    return max(1, math.ceil((z * sd / gap) ** 2 * max(1.0, design_effect)))
