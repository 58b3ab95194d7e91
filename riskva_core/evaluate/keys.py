"""How prediction entries are matched: by ``id`` (ours), else by image (another tool's).

``riskva infer`` and ``predict_split`` write a sample ``id`` into every entry. Predictions
from another tool (an OpenAI-compatible server's client, LLaMA-Factory's predict, a script)
carry ``image`` (or ``image_path``), ``raw_output`` and/or ``parsed`` and ``ground_truth``
but no id. When any entry of the predictions or of the baseline lacks an ``id``, both files
are keyed by image so the paired comparison matches the same photo on both sides:

- the key is the image's file name when file names are unique in both files (another tool
  rarely writes the same folder prefix; and no absolute path enters the report), else the
  reference exactly as written;
- an entry with neither ``id`` nor ``image``/``image_path`` is a one-line error naming it.
"""
from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Sequence

from riskva_core.errors import RiskvaError


def _image_ref(r: dict, i: int, where: str) -> str:
    ref = r.get("image") or r.get("image_path")
    if not isinstance(ref, str) or not ref.strip():
        raise RiskvaError(f"{where}: entry {i} has neither 'id' nor 'image' (or 'image_path') to match it by")
    return ref.strip()


def _file_name(ref: str) -> str:
    return PureWindowsPath(PurePosixPath(ref).name).name


def key_records(records: Sequence[dict], baseline: Sequence[dict] | None, where: str = "predictions",
                base_where: str = "baseline") -> tuple[list[dict], list[dict] | None, str]:
    """(records, baseline, "id" | "image"): entries get an ``id`` that pairs them."""
    sides = [(list(records), where)] + ([(list(baseline), base_where)] if baseline is not None else [])
    if all("id" in r for recs, _ in sides for r in recs):
        return sides[0][0], (sides[1][0] if baseline is not None else None), "id"
    refs = [[_image_ref(r, i, w) for i, r in enumerate(recs)] for recs, w in sides]
    names = [[_file_name(x) for x in side] for side in refs]
    short = all(len(set(side)) == len(side) for side in names)
    keyed = [[{**r, "id": (n if short else x)} for r, n, x in zip(recs, ns, xs)]
             for (recs, _), ns, xs in zip(sides, names, refs)]
    return keyed[0], (keyed[1] if baseline is not None else None), "image"
