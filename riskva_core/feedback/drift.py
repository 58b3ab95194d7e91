"""Do today's field photos and answers still look like the champion's test split?

Library choice (issue 28 measured the candidates with the project's pins): Evidently 0.7.23 fails
to import with pandas 3.1 (it imports a private pandas function 3.1 removed), whylogs crashes on
numpy 2, alibi-detect is BSL-licensed and would downgrade numpy, pandas and transformers. So the
tests are scipy.stats' own, each named in the report:

===================  =========================================  ===================================
descriptor           what                                       test
===================  =========================================  ===================================
width, height        pixels as displayed (EXIF orientation)     two-sample Kolmogorov-Smirnov
brightness           mean grey level (0-255)                    two-sample Kolmogorov-Smirnov
contrast             standard deviation of the grey levels      two-sample Kolmogorov-Smirnov
sharpness            variance of the 4-neighbour Laplacian      two-sample Kolmogorov-Smirnov
answer_tokens        answer length in jieba tokens              two-sample Kolmogorov-Smirnov
camera_model         EXIF Make + Model ("unknown" without)      chi-square test of homogeneity
风险等级             the level the model wrote                  chi-square test of homogeneity
parse_rate           answers the parser could read              Fisher's exact test (2x2)
===================  =========================================  ===================================

Brightness, contrast and sharpness are measured on the photo fitted into ``ANALYSIS_SIDE`` px
(JPEG draft decoding, then a box reduction), so a large photo costs little and the Laplacian sees
the same scale whatever the camera's resolution. A descriptor is *drifted* when its p-value is
below ``alpha / m`` (Bonferroni over the ``m`` descriptors tested that day), so a day with no real
change raises a false alarm with probability at most ``alpha``. A category present on one side
only, or a single category in both, is still tested (chi-square needs two categories: one
category in both is reported with p = 1). The parse-rate drop (reference − today) is reported for
the blocking check, which compares it with its own margin, not with a p-value.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from riskva_core import atomic
from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELD_LEVEL, FIELDS, LEVELS

ANALYSIS_SIDE = 512
CONTINUOUS = ("width", "height", "brightness", "contrast", "sharpness", "answer_tokens")
CATEGORICAL = ("camera_model", FIELD_LEVEL)
PHOTO_DESCRIPTORS = ("width", "height", "brightness", "contrast", "sharpness", "camera_model")
KS = "two-sample Kolmogorov-Smirnov"
CHI2 = "chi-square test of homogeneity"
FISHER = "Fisher's exact test (2x2)"
UNKNOWN_CAMERA = "unknown"
_ORIENTATION, _MAKE, _MODEL = 0x0112, 0x010F, 0x0110
_jieba_ready = False


@dataclasses.dataclass(frozen=True)
class Batch:
    """Photos and the model's answers on them, index-aligned."""

    images: Sequence[bytes]
    levels: Sequence[str]  # "" where the answer had no level
    texts: Sequence[str]  # the answer text whose length is measured
    parse_ok: Sequence[bool] | None = None  # None: unknown (e.g. ground truth as the reference)

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.levels) != n or len(self.texts) != n or (self.parse_ok is not None and len(self.parse_ok) != n):
            raise ValueError("a Batch's images, levels, texts and parse_ok must have one entry per photo")


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.05  # family-wise: Bonferroni divides it by the number of descriptors tested
    plot_dir: Path | None = None  # a PNG per drifted descriptor goes here


@dataclasses.dataclass(frozen=True)
class DescriptorTest:
    descriptor: str
    test: str
    statistic: float
    p_value: float
    drifted: bool
    reference_n: int
    current_n: int
    reference: str  # a one-line summary (median and IQR, or category shares)
    current: str


@dataclasses.dataclass
class DriftReport:
    tests: list[DescriptorTest]
    alpha: float
    corrected_alpha: float  # alpha / m
    correction: str
    parse_rate_reference: float | None
    parse_rate_current: float | None
    plots: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def drifted(self) -> list[str]:
        return [t.descriptor for t in self.tests if t.drifted]

    @property
    def parse_rate_drop(self) -> float | None:
        if self.parse_rate_reference is None or self.parse_rate_current is None:
            return None
        return self.parse_rate_reference - self.parse_rate_current

    def to_dict(self) -> dict[str, Any]:
        return {"tests": [dataclasses.asdict(t) for t in self.tests], "alpha": self.alpha,
                "corrected_alpha": self.corrected_alpha, "correction": self.correction, "drifted": self.drifted,
                "parse_rate_reference": self.parse_rate_reference, "parse_rate_current": self.parse_rate_current,
                "parse_rate_drop": self.parse_rate_drop, "plots": {k: str(v) for k, v in self.plots.items()}}

    def markdown(self) -> str:
        lines = [f"Drift: {len(self.drifted)} of {len(self.tests)} descriptors drifted "
                 f"(alpha {self.alpha:g}, {self.correction}: p < {self.corrected_alpha:.4g})", "",
                 "| descriptor | test | statistic | p-value | drifted | reference | today |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {t.descriptor} | {t.test} | {t.statistic:.4g} | {t.p_value:.3g} | {'yes' if t.drifted else 'no'} "
                  f"| {t.reference} | {t.current} |" for t in self.tests]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- descriptors


def image_descriptors(data: bytes) -> dict[str, Any]:
    """Size as displayed, brightness, contrast, sharpness (on the fitted grey picture), camera model."""
    try:
        img = Image.open(io.BytesIO(data))
        exif = img.getexif()
        width, height = img.size
        if exif.get(_ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width
        img.draft("L", (ANALYSIS_SIDE, ANALYSIS_SIDE))  # JPEG: decode at 1/2..1/8 scale directly
        grey = img.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RiskvaError(f"a photo could not be decoded for drift ({type(exc).__name__}: {exc})") from None
    factor = max(1, max(grey.size) // ANALYSIS_SIDE)
    g = np.asarray(grey.reduce(factor) if factor > 1 else grey, dtype=np.float64)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    camera = " ".join(str(exif.get(tag) or "").strip().strip("\x00") for tag in (_MAKE, _MODEL)).strip()
    return {"width": float(width), "height": float(height), "brightness": float(g.mean()),
            "contrast": float(g.std()), "sharpness": float(lap.var()) if lap.size else 0.0,
            "camera_model": camera or UNKNOWN_CAMERA}


def answer_tokens(text: str) -> int:
    """Words of the answer as jieba cuts them (whitespace and punctuation-free tokens only)."""
    global _jieba_ready
    import jieba

    if not _jieba_ready:
        jieba.setLogLevel(logging.WARNING)  # its dictionary-loading banner is not a warning
        _jieba_ready = True
    return sum(1 for tok in jieba.lcut(text or "") if tok.strip() and any(ch.isalnum() for ch in tok))


def describe(batch: Batch) -> dict[str, list]:
    """Descriptor → one value per photo."""
    per_photo = [image_descriptors(data) for data in batch.images]
    out: dict[str, list] = {name: [d[name] for d in per_photo] for name in PHOTO_DESCRIPTORS}
    out[FIELD_LEVEL] = [lvl or "(none)" for lvl in batch.levels]
    out["answer_tokens"] = [float(answer_tokens(t)) for t in batch.texts]
    return out


# --------------------------------------------------------------------------- tests


def _continuous_summary(values: Sequence[float]) -> str:
    if not len(values):
        return "-"
    q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return f"median {med:.4g} (IQR {q1:.4g}-{q3:.4g})"


def _shares(values: Sequence[str]) -> str:
    if not len(values):
        return "-"
    names, counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return ", ".join(f"{names[i]} {counts[i] / len(values):.0%}" for i in order[:4])


def ks_test(reference: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference, dtype=float), np.asarray(current, dtype=float))
    return float(result.statistic), float(result.pvalue)


def chi2_test(reference: Sequence[str], current: Sequence[str]) -> tuple[float, float]:
    from scipy.stats import chi2_contingency

    categories = sorted(set(reference) | set(current))
    if len(categories) < 2:
        return 0.0, 1.0  # one category in both: nothing differs
    table = np.array([[sum(1 for v in side if v == c) for c in categories] for side in (reference, current)])
    result = chi2_contingency(table)
    return float(result.statistic), float(result.pvalue)


def parse_rate_test(reference: Sequence[bool], current: Sequence[bool]) -> tuple[float, float]:
    """Fisher's exact test on the 2x2 table (parsed, not parsed) x (reference, today): exact at any n."""
    from scipy.stats import fisher_exact

    table = [[sum(map(bool, reference)), len(reference) - sum(map(bool, reference))],
             [sum(map(bool, current)), len(current) - sum(map(bool, current))]]
    result = fisher_exact(table)
    statistic = float(result.statistic) if np.isfinite(result.statistic) else float("inf")
    return statistic, float(result.pvalue)


def compare_batches(reference: Batch, current: Batch, config: DriftConfig = DriftConfig()) -> DriftReport:
    """Every descriptor of today's batch against the reference; PNGs of the drifted ones when asked."""
    if not 0 < config.alpha < 1:
        raise RiskvaError(f"drift alpha must be within (0, 1), got {config.alpha}")
    if not len(reference.images):
        raise RiskvaError("the drift reference holds no photos (the champion's test split is empty)")
    rates = [None if b.parse_ok is None or not len(b.parse_ok) else sum(map(bool, b.parse_ok)) / len(b.parse_ok)
             for b in (reference, current)]
    if not len(current.images):
        return DriftReport([], config.alpha, config.alpha, "no photos today: nothing tested", rates[0], None)
    ref, cur = describe(reference), describe(current)
    raw: list[tuple[str, str, float, float, int, int, str, str]] = []
    for name in CONTINUOUS:
        stat, p = ks_test(ref[name], cur[name])
        raw.append((name, KS, stat, p, len(ref[name]), len(cur[name]), _continuous_summary(ref[name]),
                    _continuous_summary(cur[name])))
    for name in CATEGORICAL:
        stat, p = chi2_test(ref[name], cur[name])
        raw.append((name, CHI2, stat, p, len(ref[name]), len(cur[name]), _shares(ref[name]), _shares(cur[name])))
    if reference.parse_ok is not None and current.parse_ok is not None:
        stat, p = parse_rate_test(reference.parse_ok, current.parse_ok)
        raw.append(("parse_rate", FISHER, stat, p, len(reference.parse_ok), len(current.parse_ok),
                    f"{rates[0]:.1%}", f"{rates[1]:.1%}"))
    corrected = config.alpha / len(raw)
    tests = [DescriptorTest(name, test, stat, p, bool(p < corrected), rn, cn, rs, cs)
             for name, test, stat, p, rn, cn, rs, cs in raw]
    report = DriftReport(tests, config.alpha, corrected, f"Bonferroni over {len(raw)} descriptors", rates[0], rates[1])
    if config.plot_dir is not None and report.drifted:
        from riskva_core.feedback.drift_plots import write_plots

        report.plots = write_plots(ref, cur, report.drifted, Path(config.plot_dir))
    return report


def outlying_photos(reference: Mapping[str, list], current: Mapping[str, list], drifted: Sequence[str]) -> list[bool]:
    """Per photo of today: does it lie outside the reference on a drifted photo descriptor?

    Outside means beyond the reference's 1st-99th percentile for a measured descriptor, or a camera
    the reference never saw. The review queue puts these photos forward (review_queue.py).
    """
    n = len(next(iter(current.values()), []))
    flags = [False] * n
    for name in drifted:
        if name not in PHOTO_DESCRIPTORS:
            continue
        if name in CONTINUOUS:
            lo, hi = np.percentile(np.asarray(reference[name], dtype=float), [1, 99])
            hits = [not lo <= v <= hi for v in current[name]]
        else:
            seen = set(reference[name])
            hits = [v not in seen for v in current[name]]
        flags = [f or h for f, h in zip(flags, hits)]
    return flags


# --------------------------------------------------------------------------- inputs


def batch_from_samples(samples: Sequence[Any], predictions: Mapping[str, Mapping[str, Any]] | None = None) -> Batch:
    """The champion's test split as the reference: its photos, and the champion's own answers on them
    (``predictions``: evaluation's records by sample id) so answers are compared with answers. Without
    predictions the ground truth stands in and the parse rate is not tested."""
    images, levels, texts, parse_ok = [], [], [], []
    for s in samples:
        data = s.image_bytes if s.image_bytes is not None else Path(s.image_file).read_bytes()
        images.append(data)
        rec = (predictions or {}).get(s.id)
        if rec is not None:
            parsed = rec.get("parsed") or {}
            levels.append(parsed.get(FIELD_LEVEL) or "")
            texts.append(rec.get("raw_output") or "")
            parse_ok.append(bool(rec.get("parse_ok")))
        else:
            levels.append(s.fields.get(FIELD_LEVEL) or "")
            texts.append("\n".join(f"{f}：{s.fields.get(f) or ''}" for f in FIELDS))
    if predictions is not None and len(parse_ok) != len(images):
        raise RiskvaError(f"predictions cover {len(parse_ok)} of the {len(images)} reference photos "
                          "(evaluate the champion on this test split)")
    return Batch(images, levels, texts, parse_ok if predictions is not None else None)


def batch_from_log(frame: Any) -> Batch:
    """The inference log's rows whose photo was kept (retention off leaves nothing to measure)."""
    kept = frame[frame["photo_path"].astype(str) != ""]
    levels = [lvl if lvl in LEVELS else "" for lvl in kept[FIELD_LEVEL].astype(str)]
    return Batch([Path(p).read_bytes() for p in kept["photo_path"]], levels, list(kept["raw_output"].astype(str)),
                 [bool(v) for v in kept["parse_ok"]])


def write_report(report: DriftReport, folder: Path) -> None:
    """``drift.json`` and ``drift.md`` beside the plots."""
    atomic.write_json(Path(folder) / "drift.json", report.to_dict())
    atomic.write_text(Path(folder) / "drift.md", report.markdown())
