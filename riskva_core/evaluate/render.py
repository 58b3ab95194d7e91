"""Render an evaluation report (the dict evaluate.py builds) as PNG charts, Markdown and HTML.

The HTML is one self-contained file: charts and thumbnails are base64 data URIs and the
style sheet is inline, so it can be mailed or attached to an MLflow run as is. The
Markdown references the PNG/JPEG files written next to it.

Byte-stable output: matplotlib is driven through the object API (no pyplot global state,
safe inside a long-running Dagster or server process) with fixed rc settings, and PNGs are
saved without the "Software" metadata that carries the matplotlib version; thumbnails are
JPEGs with fixed encoder settings. The environment has no CJK font, so charts fall back
to English level names when none is installed (the tables keep the Chinese names).
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

from PIL import Image

from riskva_core.schema import FIELD_LEVEL, FIELDS, LEVEL_INVALID, LEVELS, TEXT_FIELDS

_CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "AR PL UMing CN",
)
_ENGLISH = {"轻微": "mild", "中等": "moderate", "严重": "severe", LEVEL_INVALID: "INVALID"}
THUMB_SIZE = (160, 160)


def _cjk_font() -> str | None:
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((n for n in _CJK_FONTS if n in names), None)


def _chart_labels(labels: Sequence[str]) -> list[str]:
    return list(labels) if _cjk_font() else [_ENGLISH.get(lbl, lbl) for lbl in labels]


def _rc() -> dict[str, Any]:
    font = _cjk_font()
    return {
        "font.family": "sans-serif",
        "font.sans-serif": ([font] if font else []) + ["DejaVu Sans"],
        "font.size": 10,
        "svg.hashsalt": "riskva",
        "path.simplify": True,
    }


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Heatmap of the confusion matrix (rows truth, columns prediction), counts annotated."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_rc()):
        cm = np.asarray(confusion, dtype=float)
        names = _chart_labels(labels)
        fig = Figure(figsize=(4.8, 4.2))
        ax = fig.add_subplot()
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1.0, cm.max()))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("truth")
        ax.set_title("risk level confusion")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                dark = cm[i, j] > cm.max() / 2
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if dark else "black")
        fig.tight_layout()
        return _png(fig)


def per_class_png(per_class: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars of precision and recall per level."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_rc()):
        levels = list(LEVELS)
        x = np.arange(len(levels))
        fig = Figure(figsize=(4.8, 3.2))
        ax = fig.add_subplot()
        for k, (metric, color) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"))):
            vals = [per_class[lvl][metric] for lvl in levels]
            bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=metric, color=color)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
        ax.set_xticks(x, _chart_labels(levels))
        ax.set_ylim(0, 1.15)
        ax.set_title("per-level precision / recall")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        return _png(fig)


def thumbnail_jpeg(img: Image.Image) -> bytes:
    thumb = img.convert("RGB")
    thumb.thumbnail(THUMB_SIZE, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80, optimize=False, progressive=False, subsampling=2)
    return buf.getvalue()


# ---------------------------------------------------------------- text helpers

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _headline_rows(report: dict) -> list[tuple[str, str, str]]:
    lvl, ci = report["risk_level"], report["ci95"]
    mean_text = report["text"]["mean"]
    return [
        ("samples", _fmt(report["n"]), ""),
        ("failed images", _fmt(report["n_errors"]), ""),
        ("parse rate (all four fields)", _fmt(report["parse_rate"]), _ci(ci.get("parse_rate"))),
        ("parse ok (fields + valid level)", _fmt(report["parse_ok_rate"]), ""),
        ("level accuracy", _fmt(lvl["accuracy"]), _ci(ci.get("level_accuracy"))),
        ("level macro-F1", _fmt(lvl["macro_f1"]), _ci(ci.get("macro_f1"))),
        ("level QWK", _fmt(lvl["qwk"]), ""),
        ("严重 recall", _fmt(lvl["severe_recall"]), _ci(ci.get("severe_recall"))),
        ("under-grading rate", _fmt(lvl["under_grading_rate"]), ""),
        ("INVALID level rate", _fmt(lvl["invalid_rate"]), ""),
        ("mean ROUGE-L (char)", _fmt(mean_text["rouge_l_char"]), _ci(ci.get("rouge_l_char_mean"))),
    ]


def _text_rows(report: dict) -> list[list[str]]:
    rows = []
    for f in (*TEXT_FIELDS, "mean"):
        m = report["text"][f]
        rows.append([f, _fmt(report["field_presence"].get(f)) if f != "mean" else "",
                     _fmt(m["rouge_l_char"]), _fmt(m["bleu4_char"], 2), _fmt(m["rouge1_jieba"], 2),
                     _fmt(m["rouge2_jieba"], 2), _fmt(m["rouge_l_jieba"], 2)])
    return rows


_TEXT_HEADER = ["field", "present", "ROUGE-L char", "BLEU-4 char", "ROUGE-1 jieba", "ROUGE-2 jieba", "ROUGE-L jieba"]


def _baseline_rows(report: dict) -> list[list[str]]:
    rows = []
    lvl = report["risk_level"]
    rows.append(["this model", _fmt(lvl["accuracy"]), _fmt(lvl["macro_f1"]), _fmt(lvl["qwk"]),
                 _fmt(lvl["severe_recall"]), _fmt(report["text"]["mean"]["rouge_l_char"])])
    maj = report["baselines"]["majority"]
    rows.append([f"majority ({maj['level']})", _fmt(maj["accuracy"]), _fmt(maj["macro_f1"]), _fmt(maj["qwk"]),
                 _fmt(maj["severe_recall"]), "–"])
    sup = report["baselines"].get("supplied")
    if sup:
        s = sup["metrics"]
        rows.append([f"baseline {sup['file']}", _fmt(s["risk_level"]["accuracy"]), _fmt(s["risk_level"]["macro_f1"]),
                     _fmt(s["risk_level"]["qwk"]), _fmt(s["risk_level"]["severe_recall"]),
                     _fmt(s["text"]["mean"]["rouge_l_char"])])
    return rows


_BASELINE_HEADER = ["system", "accuracy", "macro-F1", "QWK", "严重 recall", "ROUGE-L char"]


def _paired_rows(report: dict) -> list[list[str]]:
    sup = report["baselines"].get("supplied")
    if not sup:
        return []
    rows = []
    for name, d in sup["paired"].items():
        if isinstance(d, dict):
            rows.append([name, _fmt(d["delta"], 4), _ci(d["ci95"]), _fmt(d["p_value"], 4), _fmt(d["n"])])
    return rows


_PAIRED_HEADER = ["metric (this − baseline)", "delta", "95% CI", "p-value", "paired n"]


# ---------------------------------------------------------------- Markdown

def _md_cell(v: Any) -> str:
    text = "" if v is None else str(v)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def provenance_text(prov: dict) -> str:
    """One line: model version, test split hash, generation settings (whichever are recorded)."""
    parts = []
    if prov.get("model_version") is not None:
        parts.append(f"model version {prov['model_version']}")
    if prov.get("test_split_sha256"):
        parts.append(f"test split sha256 {str(prov['test_split_sha256'])[:16]}…")
    gen = prov.get("generation")
    if gen:
        parts.append("decoding " + ", ".join(f"{k}={v}" for k, v in gen.items()))
    return "; ".join(parts)


def render_markdown(report: dict, worst: Sequence[dict], figures: dict[str, str]) -> str:
    """``figures``: name → relative file path; ``worst`` items may carry ``thumb_file``."""
    lines = ["# RisKVA evaluation report", ""]
    lines += [f"Predictions: `{report['config']['predictions']}` (sha256 {report['config']['predictions_sha256'][:16]}…), "
              f"bootstrap {report['config']['n_resamples']} resamples, seed {report['config']['seed']}.", ""]
    if report.get("provenance"):
        lines += [f"Provenance: {provenance_text(report['provenance'])}.", ""]
    lines += ["## Headline", ""]
    lines += _md_table(["metric", "value", "95% CI"], _headline_rows(report))
    lines += ["## Risk level", "", f"![confusion matrix]({figures['confusion']})", "",
              f"![per-level precision and recall]({figures['per_class']})", ""]
    lvl = report["risk_level"]
    lines += _md_table(["truth \\ predicted", *lvl["labels"]],
                       [[lab, *row] for lab, row in zip(lvl["labels"], lvl["confusion"])])
    lines += _md_table(["level", "precision", "recall", "F1", "support"],
                       [[k, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"]]
                        for k, v in lvl["per_class"].items()])
    lines += ["## Text fields", ""]
    lines += _md_table(_TEXT_HEADER, _text_rows(report))
    lines += ["## Baselines", ""]
    lines += _md_table(_BASELINE_HEADER, _baseline_rows(report))
    paired = _paired_rows(report)
    if paired:
        lines += _md_table(_PAIRED_HEADER, paired)
    lines += [f"## {len(worst)} worst samples", "",
              "Ranked by 0.5 × level correct + 0.5 × mean character ROUGE-L (lowest first).", ""]
    for i, w in enumerate(worst, 1):
        lines += [f"### {i}. `{w['id']}` (score {w['score']:.3f})", ""]
        if w.get("thumb_file"):
            lines += [f"![{w['id']}]({w['thumb_file']})", ""]
        if w.get("error"):
            lines += [f"**error:** {_md_cell(w['error'])}", ""]
        lines += _md_table(["field", "predicted", "truth"],
                           [[f, w["predicted"].get(f) if w["predicted"].get(f) is not None else "(missing)",
                             w["truth"].get(f)] for f in FIELDS])
    lines += ["## Definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em}th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts img{margin-right:1em}.worst{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.worst .row{display:flex;gap:1em}.thumb{min-width:160px}.missing{color:#b00}.err{color:#b00;font-weight:600}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em}small{color:#666}
"""


def _h(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(report: dict, worst: Sequence[dict], figures: dict[str, bytes]) -> str:
    """``figures``: name → PNG bytes; ``worst`` items may carry ``thumb`` JPEG bytes."""
    cfg = report["config"]
    parts = [
        "<!DOCTYPE html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\">",
        "<title>RisKVA evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>RisKVA evaluation report</h1>",
        f"<p><small>Predictions {_h(cfg['predictions'])} (sha256 {_h(cfg['predictions_sha256'][:16])}…), "
        f"bootstrap {_h(cfg['n_resamples'])} resamples, seed {_h(cfg['seed'])}."
        + (f" Provenance: {_h(provenance_text(report['provenance']))}." if report.get("provenance") else "")
        + "</small></p>",
        "<h2>Headline</h2>", _html_table(["metric", "value", "95% CI"], _headline_rows(report)),
        "<h2>Risk level</h2><div class=\"charts\">",
        f"<img alt=\"confusion matrix\" src=\"{_data_uri(figures['confusion'], 'image/png')}\">",
        f"<img alt=\"per-level precision and recall\" src=\"{_data_uri(figures['per_class'], 'image/png')}\">",
        "</div>",
    ]
    lvl = report["risk_level"]
    parts.append(_html_table(["truth \\ predicted", *lvl["labels"]],
                             [[lab, *row] for lab, row in zip(lvl["labels"], lvl["confusion"])]))
    parts.append(_html_table(["level", "precision", "recall", "F1", "support"],
                             [[k, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"]]
                              for k, v in lvl["per_class"].items()]))
    parts += ["<h2>Text fields</h2>", _html_table(_TEXT_HEADER, _text_rows(report))]
    parts += ["<h2>Baselines</h2>", _html_table(_BASELINE_HEADER, _baseline_rows(report))]
    paired = _paired_rows(report)
    if paired:
        parts.append(_html_table(_PAIRED_HEADER, paired))
    parts += [f"<h2>{len(worst)} worst samples</h2>",
              "<p>Ranked by 0.5 × level correct + 0.5 × mean character ROUGE-L (lowest first).</p>"]
    for i, w in enumerate(worst, 1):
        thumb = (f"<img alt=\"{_h(w['id'])}\" src=\"{_data_uri(w['thumb'], 'image/jpeg')}\">"
                 if w.get("thumb") else "<small>no image</small>")
        rows = []
        for f in FIELDS:
            pred = w["predicted"].get(f)
            pred_html = f"<span class=\"missing\">(missing)</span>" if pred is None else _h(pred)
            if f == FIELD_LEVEL and pred == LEVEL_INVALID:
                pred_html = f"<span class=\"missing\">{_h(pred)}</span>"
            rows.append(f"<tr><th>{_h(f)}</th><td>{pred_html}</td><td>{_h(w['truth'].get(f))}</td></tr>")
        err = f"<p class=\"err\">error: {_h(w['error'])}</p>" if w.get("error") else ""
        raw = (f"<details><summary>raw output</summary><pre>{_h(w.get('raw_output'))}</pre></details>"
               if w.get("raw_output") else "")
        parts.append(
            f"<div class=\"worst\"><h3>{i}. <code>{_h(w['id'])}</code> <small>score {w['score']:.3f}</small></h3>"
            f"{err}<div class=\"row\"><div class=\"thumb\">{thumb}</div>"
            f"<table><thead><tr><th>field</th><th>predicted</th><th>truth</th></tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table></div>{raw}</div>"
        )
    parts += ["<h2>Definitions</h2><ul>"]
    parts += [f"<li><b>{_h(k)}</b>: {_h(v)}</li>" for k, v in report["definitions"].items()]
    parts += ["</ul></body></html>"]
    return "\n".join(parts) + "\n"
