"""One inspector's verdict on the model's draft: the final four fields, and which of them changed.

A field counts as changed only when its meaning changed: both sides are normalised as the raw
CSV is (data/raw_csv.py: control characters, outer whitespace, full-width ASCII; 嚴重 → 严重), so
an inspector who re-typed the same words or added a trailing space accepted the draft.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from riskva_core.data.raw_csv import normalise_prose
from riskva_core.schema import FIELD_LEVEL, FIELDS, normalize_level


def normalised(field: str, value: str | None) -> str:
    text = normalise_prose(str(value or ""))
    if field == FIELD_LEVEL:
        return normalize_level(text) or text
    return text


@dataclasses.dataclass(frozen=True)
class Review:
    photo_sha256: str
    photo_path: str  # the stored field photo
    fields: Mapping[str, str]  # the inspector's final answer, the four fields
    draft: Mapping[str, str]  # the model's answer the inspector started from
    model_version: str  # the version that wrote the draft
    reviewer: str
    reviewed_at: str  # ISO 8601, UTC
    task_id: int | None = None
    trace_id: str = ""

    def changed_fields(self) -> list[str]:
        """The fields whose normalised text differs from the draft, in the schema's order."""
        return [f for f in FIELDS if normalised(f, self.fields.get(f)) != normalised(f, self.draft.get(f))]

    def final(self) -> dict[str, str]:
        """The four fields as they go into the dataset (normalised like a validated CSV row)."""
        return {f: normalised(f, self.fields.get(f)) for f in FIELDS}
