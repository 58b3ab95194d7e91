"""Reading a raw CSV as text and normalising only its unambiguous variants.

Reading: the encoding is detected (UTF-8, UTF-8/UTF-16 with BOM, GB18030/GBK); every cell is
text; headers are normalised; extra columns are kept. Normalising: surrounding whitespace
everywhere; NFKC for image_id and 风险等级; 嚴重/輕微 → 严重/轻微; full-width ASCII
letters/digits in the free-text fields; control characters (NUL, BEL, ESC, C1 codes, zero-width
and BOM characters) removed from every text cell, CR/CRLF → LF and tab → space, so nothing
invisible reaches the training text or the tokenizer. Full-width CJK punctuation (，。：) is
kept: it is correct Chinese and the model should learn to write it. image_path is only
stripped, since file names are literal (a control character in it is rejected by
data/images.py). Every change is returned so the validation report can list it.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import pandas as pd

from riskva_core.errors import RiskvaError
from riskva_core.schema import CSV_COLUMNS, FIELD_LEVEL, FIELD_TO_COLUMN, REQUIRED_COLUMNS, normalize_level, normalize_text

LEVEL_COLUMN = FIELD_TO_COLUMN[FIELD_LEVEL]
_FULLWIDTH_ALNUM = re.compile(r"[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")
# C0 controls except LF, DEL, C1 controls, and invisible format characters (zero-width space/joiners,
# word joiner, BOM) that copy-paste from spreadsheets and chat tools leaves in cells.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")


def decode_csv_bytes(raw: bytes, name: str) -> tuple[str, str]:
    """(text, encoding): BOMs first, then strict UTF-8, then strict GB18030 (a superset of GBK)."""
    if raw.startswith(codecs.BOM_UTF8):
        candidates = ["utf-8-sig"]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = ["utf-16"]
    else:
        candidates = ["utf-8", "gb18030"]
    for enc in candidates:
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise RiskvaError(f"{name}: cannot decode the CSV (tried {', '.join(candidates)}); save it as UTF-8")


def read_raw_csv(csv_path: str | os.PathLike) -> tuple[pd.DataFrame, str, str]:
    """(all-text DataFrame with normalised headers, encoding, sha256 of the file bytes)."""
    p = Path(csv_path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RiskvaError(f"--csv_path {p}: no such file") from None
    except OSError as exc:
        raise RiskvaError(f"--csv_path {p}: cannot read ({exc.strerror or exc})") from None
    sha = hashlib.sha256(raw).hexdigest()
    text, encoding = decode_csv_bytes(raw, str(p))
    if not text.strip():
        raise RiskvaError(f"{p}: empty CSV")
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise RiskvaError(f"{p}: empty CSV") from None
    except (pd.errors.ParserError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RiskvaError(f"{p}: malformed CSV ({first})") from None
    headers = [normalize_text(str(c)) for c in df.columns]
    dupes = sorted({h for h in headers if headers.count(h) > 1})
    if dupes:
        raise RiskvaError(f"{p}: duplicate column(s) {', '.join(dupes)}")
    df.columns = headers
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise RiskvaError(f"{p}: missing required column(s) {', '.join(missing)} (found: {', '.join(headers)})")
    if len(df) == 0:
        raise RiskvaError(f"{p}: no data rows")
    # Short rows come back as NaN even with na_filter off; a missing cell is an empty cell.
    df = df.fillna("").astype(str).reset_index(drop=True)
    return df, encoding, sha


# --------------------------------------------------------------------------- normalising


def strip_controls(value: str) -> str:
    """CRLF/CR → LF, tab → space, then every other control/invisible format character removed."""
    value = value.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return _CONTROL.sub("", value)


def normalise_prose(value: str) -> str:
    """Controls removed; outer whitespace stripped; full-width ASCII letters/digits to ASCII; CJK punctuation kept."""
    value = _FULLWIDTH_ALNUM.sub(lambda m: unicodedata.normalize("NFKC", m.group()), strip_controls(value))
    return value.strip()


def _normalise_cell(column: str, value: str) -> str:
    if column == LEVEL_COLUMN:
        return normalize_level(strip_controls(value)) or normalize_text(strip_controls(value))
    if column == "image_id":
        return normalize_text(strip_controls(value))
    if column == "image_path":
        return value.strip()
    return normalise_prose(value)


def normalise_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """A copy with the CSV_COLUMNS normalised, and the list of changes (row, column, before, after)."""
    out = df.copy()
    changes: list[dict[str, Any]] = []
    if "image_id" not in out.columns:
        out.insert(0, "image_id", [str(i) for i in range(len(out))])
    for column in CSV_COLUMNS:
        values = out[column].tolist()
        new_values = []
        for row, before in enumerate(values):
            after = _normalise_cell(column, before)
            if column == "image_id" and not after:
                after = str(row)  # an empty id is synthesised like a missing column
            if after != before:
                changes.append({"row": row, "column": column, "before": before, "after": after})
            new_values.append(after)
        out[column] = new_values
    changes.sort(key=lambda c: (c["row"], CSV_COLUMNS.index(c["column"])))
    return out, changes
