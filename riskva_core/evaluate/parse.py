"""Read the four report fields back out of a model's free-text answer.

The model is trained on the seed's answer shape (``**风险描述**: …`` one field per
line, see conversation.DEFAULT_ANSWER_TEMPLATE) but a partly trained or prompted
model drifts: full-width colons, lost bold markers, reordered or extra fields,
values spread over several lines, or a JSON object (bare or in a ```json fence).
All of those are read. Nothing is guessed: a field that is not there is ``None``
and a 风险等级 that is not one of the three levels (after the same normalisation
validation applies, schema.normalize_level) is ``"INVALID"``.

Rules worth knowing:
- a key is recognised at the start of a line (after optional list markers / ``#``),
  bold or not, followed by ``:`` or ``：``; a **bold** key is also recognised mid-line;
- a value runs until the next recognised key, so multi-line values are kept whole;
  unknown fields end the previous value only when bold (``**位置信息**:``) or when
  listed in ``EXTRA_KEYS``, otherwise a line like ``注意：…`` stays part of the value;
- when a key occurs twice, the first occurrence wins;
- an empty value counts as missing;
- the 风险等级 value may carry punctuation, whitespace, bold markers or brackets around it,
  half- or full-width (``严重。``, ``严重 ``, ``：严重``, ``「严重」``, ``**严重**；``): only those
  are stripped, from both ends, and what remains must be exactly a level, so ``较严重``,
  ``轻微/中等/严重`` or ``严重风险很高`` stay ``"INVALID"``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from typing import Any

from riskva_core.schema import FIELD_ADVICE, FIELD_DESC, FIELD_LEVEL, FIELD_RISK, FIELDS, LEVEL_INVALID, normalize_level

# Spellings of each key in an answer → canonical field name. 风险描述 is the seed's
# label for data_风险; longer names come first so "风险" never shadows "风险等级".
KEY_ALIASES: dict[str, str] = {
    "风险描述": FIELD_RISK,
    "风险等级": FIELD_LEVEL,
    "纠正和预防建议": FIELD_ADVICE,
    "缺陷描述": FIELD_DESC,
    "风险": FIELD_RISK,
}
# Fields the seed suggests adding; they end the previous value even without bold.
EXTRA_KEYS: tuple[str, ...] = ("位置信息", "位置")

_COLON = r"[:：]"
_KNOWN = "|".join(re.escape(k) for k in sorted({*KEY_ALIASES, *EXTRA_KEYS}, key=len, reverse=True))
# Line-start key: optional indent, list marker or heading, optional bold/brackets.
_LINE_KEY = re.compile(
    rf"(?m)^[ \t]*(?:[-*•·][ \t]+|\d+[.、)）][ \t]*|#+[ \t]*)?(?:\*\*|__)?[【\[]?[ \t]*(?P<key>{_KNOWN})"
    rf"[ \t]*[】\]]?[ \t]*(?:\*\*|__)?[ \t]*{_COLON}[ \t]*(?:\*\*|__)?"
)
# Bold key anywhere (also unknown bold keys such as **备注**:), e.g. all fields on one line.
_BOLD_KEY = re.compile(rf"\*\*[ \t]*(?P<key>[^\s*:：]{{1,12}}?)[ \t]*(?:\*\*[ \t]*{_COLON}|{_COLON}[ \t]*\*\*)")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(?P<body>.*?)```", re.S)


@dataclasses.dataclass(frozen=True)
class ParseResult:
    parsed: dict[str, str | None]
    parse_ok: bool
    source: str  # "markdown", "json" or "none": which reader found the fields

    def to_dict(self) -> dict[str, Any]:
        return {"parsed": dict(self.parsed), "parse_ok": self.parse_ok}


def parse_answer(text: str | None) -> ParseResult:
    """Parse one answer; ``parse_ok`` means all four fields present and the level valid."""
    text = text or ""
    fields = _parse_json(text)
    source = "json"
    if fields is None:
        fields = _parse_markdown(text)
        source = "markdown" if any(v is not None for v in fields.values()) else "none"
    level = fields.get(FIELD_LEVEL)
    if level is not None:
        fields[FIELD_LEVEL] = parse_level(level)
    parsed = {f: fields.get(f) for f in FIELDS}
    ok = all(v is not None for v in parsed.values()) and parsed[FIELD_LEVEL] != LEVEL_INVALID
    return ParseResult(parsed=parsed, parse_ok=ok, source=source)


def _decoration(ch: str) -> bool:
    # Punctuation (P*: 。，：；！?、()「」【】*_…), separators/spaces (Z*: incl. U+3000), control
    # characters (newlines) and markdown symbols (Sk/Sm: ` ~ > ＞): never part of a level word.
    return unicodedata.category(ch)[0] in "PZC" or unicodedata.category(ch) in ("Sk", "Sm")


def parse_level(value: str) -> str:
    """The canonical level of a 风险等级 value, or ``"INVALID"``: decoration stripped from both ends only."""
    level = normalize_level(value)
    if level is not None:
        return level
    start, end = 0, len(value)
    while start < end and _decoration(value[start]):
        start += 1
    while end > start and _decoration(value[end - 1]):
        end -= 1
    return normalize_level(value[start:end]) or LEVEL_INVALID


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    # Stray bold markers around a value ("**严重**") and outer whitespace carry no content.
    value = value.strip().strip("*_").strip()
    return value or None


def _parse_json(text: str) -> dict[str, str | None] | None:
    """The fields of a JSON object answer, or None when the answer is not JSON."""
    candidates = [m.group("body") for m in _FENCE.finditer(text)]
    stripped = text.strip()
    if stripped.startswith("{"):
        candidates.insert(0, stripped)
    for cand in candidates:
        cand = cand.strip()
        if not cand.startswith("{"):
            continue
        try:
            obj = json.loads(cand)
        except json.JSONDecodeError:
            # Trailing prose after the object: decode the first object only.
            try:
                obj, _ = json.JSONDecoder().raw_decode(cand)
            except json.JSONDecodeError:
                continue
        if not isinstance(obj, dict):
            continue
        fields: dict[str, str | None] = {}
        for key, value in obj.items():
            name = KEY_ALIASES.get(str(key).strip().strip("*").strip())
            if name is not None and name not in fields:
                fields[name] = _clean(value)
        if fields:
            return fields
    return None


def _parse_markdown(text: str) -> dict[str, str | None]:
    # Each hit: start of the key (line start for a line key), end incl. colon, canonical
    # name (None for an extra field, which only ends the previous value).
    hits: list[tuple[int, int, str | None]] = [
        (m.start(), m.end(), KEY_ALIASES.get(m.group("key"))) for m in _LINE_KEY.finditer(text)
    ]
    line_spans = [(s, e) for s, e, _ in hits]
    for m in _BOLD_KEY.finditer(text):
        if not any(s <= m.start() < e for s, e in line_spans):
            hits.append((m.start(), m.end(), KEY_ALIASES.get(m.group("key"))))
    hits.sort()
    fields: dict[str, str | None] = {}
    for i, (_, value_start, name) in enumerate(hits):
        value_end = hits[i + 1][0] if i + 1 < len(hits) else len(text)
        if name is not None and name not in fields:
            fields[name] = _clean(text[value_start:value_end])
    return fields
