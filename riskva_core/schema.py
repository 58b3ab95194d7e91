"""The data contract shared by every step: column names, report fields, risk levels.

Everything that reads or writes a CSV row, a prepared sample, a prediction or a
report imports its names from here, so a renamed field fails loudly everywhere.
"""
from __future__ import annotations

import unicodedata

# The four report fields, in the order the answer lists them.
FIELD_RISK = "风险"
FIELD_LEVEL = "风险等级"
FIELD_ADVICE = "纠正和预防建议"
FIELD_DESC = "缺陷描述"
FIELDS: tuple[str, ...] = (FIELD_RISK, FIELD_LEVEL, FIELD_ADVICE, FIELD_DESC)
TEXT_FIELDS: tuple[str, ...] = (FIELD_RISK, FIELD_ADVICE, FIELD_DESC)

# Ordered from mild to severe: the order is used by QWK and under-grading.
LEVELS: tuple[str, ...] = ("轻微", "中等", "严重")
LEVEL_INVALID = "INVALID"
LEVEL_RANK = {lvl: i for i, lvl in enumerate(LEVELS)}

# The served model's table contract (MLflow pyfunc): image bytes in, the report out.
# Evaluation scores registered models through the same columns it serves.
INPUT_COLUMN = "image"
# ``error`` is "" for an answered row and names the row and the reason otherwise.
OUTPUT_COLUMNS: tuple[str, ...] = (*FIELDS, "raw_output", "parse_ok", "error")

# The seed's raw CSV columns, in the seed's order.
CSV_COLUMNS: tuple[str, ...] = (
    "image_id",
    "image_path",
    "data_风险",
    "data_纠正和预防建议",
    "data_风险等级",
    "data_缺陷描述",
)
REQUIRED_COLUMNS: tuple[str, ...] = CSV_COLUMNS[1:]  # image_id may be synthesised
FIELD_TO_COLUMN = {f: f"data_{f}" for f in FIELDS}

# Traditional-script and alias spellings that map to exactly one level.
# Anything else (e.g. "较严重", "高") is ambiguous and is rejected, never guessed.
_LEVEL_ALIASES = {
    "輕微": "轻微",
    "嚴重": "严重",
    "中等": "中等",
}


def normalize_text(value: str) -> str:
    """NFKC (full-width → half-width ASCII, compatibility forms) and outer whitespace."""
    return unicodedata.normalize("NFKC", value).strip()


def normalize_level(value: object) -> str | None:
    """Return the canonical level for an unambiguous spelling, else None."""
    if value is None:
        return None
    text = normalize_text(str(value))
    text = "".join(text.split())  # "严 重" → "严重": inner spaces carry no meaning
    if text in LEVEL_RANK:
        return text
    return _LEVEL_ALIASES.get(text)
