"""One PNG per drifted descriptor: the reference against today, for the Dagster UI.

matplotlib's object API (``Figure``, no pyplot: no global state, safe in a server thread) with
the Agg canvas; PNGs carry no timestamp or software tag, so equal data gives equal bytes.
Continuous descriptors are overlaid density histograms on shared bins; categories are grouped bars
of shares. Chinese level names are drawn in English (a CJK font is not guaranteed on the host).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from riskva_core import atomic

_ENGLISH = {"轻微": "mild", "中等": "moderate", "严重": "severe", "风险等级": "risk level", "(none)": "(none)"}
_BINS = 20


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def descriptor_png(name: str, reference: Sequence, current: Sequence) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.add_subplot()
    title = _ENGLISH.get(name, name)
    if len(reference) and isinstance(reference[0], str):
        cats = sorted(set(reference) | set(current))
        x = np.arange(len(cats))
        for k, (values, label, color) in enumerate(((reference, "reference", "#4c72b0"), (current, "today", "#dd8452"))):
            shares = [sum(1 for v in values if v == c) / max(1, len(values)) for c in cats]
            ax.bar(x + (k - 0.5) * 0.4, shares, 0.4, label=f"{label} (n={len(values)})", color=color)
        ax.set_xticks(x, [_ENGLISH.get(c, c) if c.isascii() or c in _ENGLISH else f"#{i}" for i, c in enumerate(cats)],
                      rotation=20, ha="right")
        ax.set_ylabel("share")
    else:
        both = np.asarray([*reference, *current], dtype=float)
        bins = np.histogram_bin_edges(both, bins=_BINS) if both.size and np.ptp(both) > 0 else _BINS
        for values, label, color in ((reference, "reference", "#4c72b0"), (current, "today", "#dd8452")):
            ax.hist(np.asarray(values, dtype=float), bins=bins, density=True, alpha=0.55, color=color,
                    label=f"{label} (n={len(values)})")
        ax.set_ylabel("density")
    ax.set_title(f"{title}: reference vs today")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def write_plots(reference: Mapping[str, Sequence], current: Mapping[str, Sequence], names: Sequence[str],
                folder: Path) -> dict[str, Path]:
    """``<folder>/<descriptor>.png`` for each name (the parse rate has no per-photo values: no plot)."""
    out: dict[str, Path] = {}
    for name in names:
        if name not in reference or name not in current:
            continue
        path = Path(folder) / f"{'risk_level' if name == '风险等级' else name}.png"
        atomic.write_bytes(path, descriptor_png(name, list(reference[name]), list(current[name])))
        out[name] = path
    return out
