"""Validate a raw CSV and its images; quarantine bad rows with a reason, never drop them silently.

Pipeline, all failures collected in one pass so a data owner fixes the CSV once:

1. Read: encoding detected (UTF-8, UTF-8/UTF-16 with BOM, GB18030/GBK); every cell is text;
   extra columns are kept and passed through untouched.
2. Normalise only unambiguous variants, each change recorded in the report:
   surrounding whitespace everywhere; NFKC for image_id and 风险等级; 嚴重/輕微 → 严重/轻微;
   full-width ASCII letters/digits in the free-text fields. Full-width CJK punctuation
   (，。：) in free text is deliberately kept: it is correct Chinese and the model should
   learn to write it. image_path is only stripped, since file names are literal.
3. Schema (pandera, lazy): required columns non-empty, 风险等级 one of 轻微/中等/严重.
4. Paths confined to the dataset folder (images.resolve_image_path).
5. Same image_path twice: an exact repeat (same four fields) is rejected as
   "duplicate of row K" and the first occurrence kept; different fields are a conflict
   and every conflicting row is rejected.
6. Images checked in worker processes (images.inspect_image), each file once.
7. Same image content (file sha256) under different fields: all those rows rejected.

Exit codes: 0 passed; 3 rejected fraction above --max_reject_ratio (report still written);
2 unusable input (unreadable or empty CSV, missing required columns, bad flags).
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series
from tqdm import tqdm

from riskva_core import atomic
from riskva_core.errors import RiskvaError
from riskva_core.data.raw_csv import LEVEL_COLUMN, normalise_frame, read_raw_csv
from riskva_core.data.images import DEFAULT_MAX_IMAGE_PIXELS, EncodeSpec, ImagePathError, ImageReport, inspect_image, resolve_image_path
from riskva_core.schema import (
    CSV_COLUMNS,
    FIELD_ADVICE,
    FIELD_DESC,
    FIELD_RISK,
    FIELD_TO_COLUMN,
    FIELDS,
    LEVELS,
)

REPORT_JSON = "validation_report.json"
REPORT_MD = "validation_report.md"
EXIT_TOO_MANY_REJECTS = 3


class RawCsvSchema(pa.DataFrameModel):
    """The raw CSV after normalisation. Extra columns are allowed and passed through."""

    image_id: Series[str] = pa.Field(str_length={"min_value": 1})
    image_path: Series[str] = pa.Field(str_length={"min_value": 1})
    risk: Series[str] = pa.Field(alias=FIELD_TO_COLUMN[FIELD_RISK], str_length={"min_value": 1})
    advice: Series[str] = pa.Field(alias=FIELD_TO_COLUMN[FIELD_ADVICE], str_length={"min_value": 1})
    level: Series[str] = pa.Field(alias=LEVEL_COLUMN, isin=list(LEVELS))
    description: Series[str] = pa.Field(alias=FIELD_TO_COLUMN[FIELD_DESC], str_length={"min_value": 1})

    class Config:
        strict = False
        coerce = False
        name = "riskva raw CSV"


@dataclasses.dataclass(frozen=True)
class ValidRecord:
    """One accepted CSV row, normalised, with its image resolved and checked."""

    row: int  # 0-based data-row index in the source CSV
    image_id: str
    image_path: str  # as in the CSV (stripped), relative to the dataset folder
    image_file: Path  # resolved absolute path inside the dataset folder
    image_sha256: str  # sha256 of the source file bytes
    fields: dict[str, str]
    extra: dict[str, str]
    image: ImageReport


@dataclasses.dataclass
class ValidationResult:
    records: list[ValidRecord]
    report: dict[str, Any]
    passed: bool


# --------------------------------------------------------------------------- checking


def _schema_reason(column: str, check: str, value: Any) -> str:
    if check.startswith("str_length"):
        return f"{column} is empty"
    if check.startswith("isin"):
        return f"{column} {value!r} is not one of {'/'.join(LEVELS)}"
    return f"{column} failed {check} ({value!r})"


def schema_failures(df: pd.DataFrame) -> dict[int, list[str]]:
    """Row index → schema reasons, every failure collected in one lazy pandera pass."""
    try:
        RawCsvSchema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        failures: dict[int, list[str]] = {}
        order = {c: i for i, c in enumerate(CSV_COLUMNS)}
        cases = err.failure_cases
        rows = []
        for case in cases.to_dict("records"):
            index = case.get("index")
            column = str(case.get("column"))
            if index is None or pd.isna(index):
                # A column-level failure (wrong dtype...): cannot happen for all-text input.
                raise RiskvaError(f"schema error in column {column}: {case.get('check')}") from None
            rows.append((int(index), order.get(column, 99), _schema_reason(column, str(case["check"]), case["failure_case"])))
        for index, _, reason in sorted(rows):
            failures.setdefault(index, []).append(reason)
        return failures
    return {}


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork on Linux, the platform default elsewhere.

    spawn would re-import the caller's ``__main__`` in every worker (an unguarded script or
    notebook cell then fails or runs twice) and costs ~0.5 s per worker. The workers only
    run Pillow/numpy on their own file and never touch locks or threads of the parent,
    the same trade-off PyTorch's DataLoader makes by default on Linux.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _run_inspections(
    files: Sequence[str], max_pixels: int, encode: EncodeSpec | None, num_workers: int | None
) -> list[ImageReport]:
    """inspect_image over ``files`` in worker processes; results in input order."""
    workers = num_workers if num_workers is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    # A pool only pays for itself with a few files per worker.
    workers = max(1, min(workers, len(files) // 4))
    job = partial(inspect_image, max_pixels=max_pixels, encode=encode)
    bar = tqdm(total=len(files), desc="images", unit="img", disable=None, file=sys.stderr)
    try:
        if workers == 1:
            results = []
            for f in files:
                results.append(job(f))
                bar.update()
            return results
        chunksize = max(1, min(16, len(files) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
            results = []
            for rep in pool.map(job, files, chunksize=chunksize):
                results.append(rep)
                bar.update()
            return results
    finally:
        bar.close()


def _labels(df: pd.DataFrame, row: int) -> tuple[str, ...]:
    return tuple(df.at[row, FIELD_TO_COLUMN[f]] for f in FIELDS)


def _rows_text(rows: Iterable[int]) -> str:
    rows = sorted(rows)
    return f"row {rows[0]}" if len(rows) == 1 else "rows " + ", ".join(str(r) for r in rows)


def validate(
    csv_path: str | os.PathLike,
    image_base_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    max_reject_ratio: float = 0.1,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
    encode: EncodeSpec | None = None,
) -> ValidationResult:
    """Validate ``csv_path`` against the images under ``image_base_path``.

    ``encode`` (used by prepare) also writes each valid image's normalised JPEG during
    the same decode. Reports go to ``output_dir`` when given. Raises RiskvaError (exit 2)
    for unusable input; a too-high reject fraction is ``passed=False``, not an exception.
    """
    if not 0.0 <= max_reject_ratio <= 1.0:
        raise RiskvaError(f"--max_reject_ratio must be within [0, 1], got {max_reject_ratio}")
    if max_image_pixels < 1:
        raise RiskvaError(f"--max_image_pixels must be positive, got {max_image_pixels}")
    base = Path(image_base_path)
    if not base.is_dir():
        raise RiskvaError(f"--image_base_path {base}: not a folder")
    base = base.resolve()

    raw, encoding, csv_sha = read_raw_csv(csv_path)
    df, normalised = normalise_frame(raw)
    n = len(df)
    reasons: dict[int, list[str]] = {i: [] for i in range(n)}
    warnings: dict[int, list[str]] = {i: [] for i in range(n)}
    for row, rs in schema_failures(df).items():
        reasons[row].extend(rs)

    # Paths: resolve in this process (cheap), so duplicates are found on the real file.
    resolved: dict[int, Path] = {}
    for row in range(n):
        value = df.at[row, "image_path"]
        if not value:
            continue  # already reported by the schema
        try:
            resolved[row] = resolve_image_path(base, value)
        except ImagePathError as exc:
            reasons[row].append(str(exc))

    by_path: dict[Path, list[int]] = {}
    for row, path in resolved.items():
        if not reasons[row]:
            by_path.setdefault(path, []).append(row)
    for rows in by_path.values():
        if len(rows) < 2:
            continue
        labels = {r: _labels(df, r) for r in rows}
        if len(set(labels.values())) == 1:
            for r in rows[1:]:
                reasons[r].append(f"duplicate of row {rows[0]}")
        else:
            for r in rows:
                others = [o for o in rows if labels[o] != labels[r]]
                reasons[r].append(f"conflicting labels: same image_path as {_rows_text(others)} with different fields")

    # Each distinct file is inspected once, in first-occurrence order (deterministic).
    files = list(dict.fromkeys(str(p) for p in resolved.values()))
    reports = dict(zip(files, _run_inspections(files, max_image_pixels, encode, num_workers)))
    for row, path in resolved.items():
        rep = reports[str(path)]
        reasons[row].extend(r for r in rep.reasons if r not in reasons[row])
        warnings[row].extend(rep.warnings)

    by_content: dict[str, list[int]] = {}
    for row, path in resolved.items():
        sha = reports[str(path)].sha256
        if sha and not reasons[row]:
            by_content.setdefault(sha, []).append(row)
    for rows in by_content.values():
        if len(rows) < 2:
            continue
        labels = {r: _labels(df, r) for r in rows}
        for r in rows:
            others = [o for o in rows if labels[o] != labels[r]]
            if others:
                reasons[r].append(f"conflicting labels: same image content as {_rows_text(others)} with different fields")
            elif r != rows[0]:
                warnings[r].append(f"same image content as row {rows[0]} (same fields); kept, never split apart")

    ids: dict[str, int] = {}
    for row in range(n):
        first = ids.setdefault(df.at[row, "image_id"], row)
        if first != row and not reasons[row]:
            warnings[row].append(f"image_id {df.at[row, 'image_id']!r} repeats row {first}")

    extra_columns = [c for c in df.columns if c not in CSV_COLUMNS]
    records: list[ValidRecord] = []
    for row in range(n):
        if reasons[row]:
            continue
        rep = reports[str(resolved[row])]
        records.append(
            ValidRecord(
                row=row,
                image_id=df.at[row, "image_id"],
                image_path=df.at[row, "image_path"],
                image_file=resolved[row],
                image_sha256=rep.sha256 or "",
                fields={f: df.at[row, FIELD_TO_COLUMN[f]] for f in FIELDS},
                extra={c: raw.at[row, c] for c in extra_columns},
                image=rep,
            )
        )

    rejected = [
        {"row": r, "image_path": df.at[r, "image_path"], "reasons": reasons[r]} for r in range(n) if reasons[r]
    ]
    reject_ratio = len(rejected) / n
    passed = bool(records) and reject_ratio <= max_reject_ratio
    report: dict[str, Any] = {
        "csv_path": str(Path(csv_path).resolve()),
        "csv_sha256": csv_sha,
        "encoding": encoding,
        "image_base_path": str(base),
        "max_reject_ratio": max_reject_ratio,
        "max_image_pixels": max_image_pixels,
        "extra_columns": extra_columns,
        "rows_total": n,
        "rows_valid": len(records),
        "rows_rejected": len(rejected),
        "reject_ratio": round(reject_ratio, 6),
        "passed": passed,
        "rejected": rejected,
        "normalised": normalised,
        "warnings": [
            {"row": r, "image_path": df.at[r, "image_path"], "warning": w} for r in range(n) for w in warnings[r]
        ],
    }
    if output_dir is not None:
        write_reports(report, output_dir)
    return ValidationResult(records=records, report=report, passed=passed)


# --------------------------------------------------------------------------- reporting


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def report_markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        "# Validation report",
        "",
        f"- CSV: `{report['csv_path']}` (sha256 `{report['csv_sha256'][:16]}…`, {report['encoding']})",
        f"- Images: `{report['image_base_path']}`",
        f"- Rows: {report['rows_total']} total, {report['rows_valid']} valid, {report['rows_rejected']} rejected "
        f"({report['reject_ratio']:.1%}; limit {report['max_reject_ratio']:.1%}) — **{verdict}**",
        "",
        "Rows are 0-based data-row indices (the header is not counted).",
        "",
        f"## Rejected rows ({report['rows_rejected']})",
        "",
    ]
    if report["rejected"]:
        lines += ["| row | image_path | reasons |", "|---:|---|---|"]
        lines += [f"| {r['row']} | {_md_cell(r['image_path'])} | {_md_cell('; '.join(r['reasons']))} |" for r in report["rejected"]]
    else:
        lines.append("None.")
    lines += ["", f"## Normalised cells ({len(report['normalised'])})", ""]
    if report["normalised"]:
        lines += ["| row | column | before | after |", "|---:|---|---|---|"]
        lines += [
            f"| {c['row']} | {_md_cell(c['column'])} | {_md_cell(repr(c['before']))} | {_md_cell(repr(c['after']))} |"
            for c in report["normalised"]
        ]
    else:
        lines.append("None.")
    lines += ["", f"## Warnings ({len(report['warnings'])})", ""]
    if report["warnings"]:
        lines += ["| row | image_path | warning |", "|---:|---|---|"]
        lines += [f"| {w['row']} | {_md_cell(w['image_path'])} | {_md_cell(w['warning'])} |" for w in report["warnings"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], output_dir: str | os.PathLike) -> None:
    out = Path(output_dir)
    atomic.write_json(out / REPORT_JSON, report)
    atomic.write_text(out / REPORT_MD, report_markdown(report))


def summary_lines(report: dict[str, Any], max_rows: int = 10) -> list[str]:
    lines = [
        f"{report['rows_total']} rows: {report['rows_valid']} valid, {report['rows_rejected']} rejected "
        f"({report['reject_ratio']:.1%}), {len(report['normalised'])} cells normalised, "
        f"{len(report['warnings'])} warnings"
    ]
    for r in report["rejected"][:max_rows]:
        lines.append(f"  row {r['row']} ({r['image_path']}): {'; '.join(r['reasons'])}")
    if len(report["rejected"]) > max_rows:
        lines.append(f"  … {len(report['rejected']) - max_rows} more in {REPORT_JSON}")
    return lines


def failure_message(report: dict[str, Any], where: str | os.PathLike | None) -> str:
    if not report["rows_valid"]:
        head = f"all {report['rows_total']} rows rejected"
    else:
        head = (
            f"{report['rows_rejected']} of {report['rows_total']} rows rejected ({report['reject_ratio']:.1%}), "
            f"above --max_reject_ratio {report['max_reject_ratio']:g}"
        )
    tail = f"; see {Path(where) / REPORT_JSON}" if where is not None else "; rerun with --output_path to keep the report"
    return head + tail


# --------------------------------------------------------------------------- CLI


def add_validation_args(parser: argparse.ArgumentParser, csv_required: bool = True) -> None:
    parser.add_argument("--csv_path", required=csv_required, help="raw CSV (image_path, data_风险, data_纠正和预防建议, data_风险等级, data_缺陷描述; image_id optional)")
    parser.add_argument("--image_base_path", required=csv_required, help="dataset folder; every image_path must stay inside it")
    parser.add_argument("--max_reject_ratio", type=float, default=0.1, help="fail (exit 3) when more than this fraction of rows is rejected (default 0.1)")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help=f"reject images with more pixels than this (default {DEFAULT_MAX_IMAGE_PIXELS}, Pillow's bomb limit)")
    parser.add_argument("--num_workers", type=int, default=None, help="image-checking processes (default: one per CPU core)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="riskva validate", description="Validate a raw CSV and its images; write validation_report.json/.md.")
    add_validation_args(parser)
    parser.add_argument("--output_path", default=None, help="folder for validation_report.json and .md (default: print only)")
    args = parser.parse_args(argv)
    result = validate(
        args.csv_path,
        args.image_base_path,
        output_dir=args.output_path,
        max_reject_ratio=args.max_reject_ratio,
        max_image_pixels=args.max_image_pixels,
        num_workers=args.num_workers,
    )
    print("\n".join(summary_lines(result.report)))
    if args.output_path:
        print(f"report: {Path(args.output_path) / REPORT_JSON}")
    if not result.passed:
        raise RiskvaError(failure_message(result.report, args.output_path), EXIT_TOO_MANY_REJECTS)
    return 0
