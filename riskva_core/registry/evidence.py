"""No decision on stale evidence: predictions and reports say which model and which test split they are for.

Evaluation writes ``model_version`` and ``test_split_sha256`` (the prepared test file's sha256,
dataset_info.json → ``splits.test.sha256``) on every prediction record and into the report's
``provenance``. Promotion checks both against the version it decides on and the test split as it
is now, and refuses otherwise: a predictions file left over from an earlier version, or scored
on a test split that was re-prepared since, never decides a promotion.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from riskva_core.errors import RiskvaError

MODEL_VERSION = "model_version"
TEST_SPLIT_SHA = "test_split_sha256"


def test_split_sha256(prepared_dir: str | Path) -> str:
    """The content hash of a prepared folder's test split, as prepare recorded it."""
    info_file = Path(prepared_dir) / "dataset_info.json"
    try:
        return str(json.loads(info_file.read_text(encoding="utf-8"))["splits"]["test"]["sha256"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise RiskvaError(f"{info_file}: no test split hash (prepare the dataset again)") from None


def stamp(records: Sequence[Mapping[str, Any]], model_version: str, split_sha: str) -> list[dict[str, Any]]:
    """The records, each saying which model version answered and on which test split."""
    return [{**r, MODEL_VERSION: str(model_version), TEST_SPLIT_SHA: split_sha} for r in records]


def problems(records: Sequence[Mapping[str, Any]], report: Mapping[str, Any] | None, model_version: str,
             split_sha: str, what: str = "predictions") -> list[str]:
    """Why this evidence is not for ``model_version`` on the test split ``split_sha`` (empty: it is)."""
    out: list[str] = []
    if not records:
        out.append(f"{what}: empty")
    versions = {str(r.get(MODEL_VERSION)) for r in records}
    splits = {str(r.get(TEST_SPLIT_SHA)) for r in records}
    if versions != {str(model_version)}:
        out.append(f"{what} are for model version(s) {', '.join(sorted(versions))}, not v{model_version}")
    if splits != {split_sha}:
        out.append(f"{what} were scored on test split(s) {', '.join(s[:12] for s in sorted(splits))}, "
                   f"not the current test split {split_sha[:12]}")
    if report is not None:
        prov = report.get("provenance") or {}
        if str(prov.get(MODEL_VERSION)) != str(model_version):
            out.append(f"report is for model version {prov.get(MODEL_VERSION)}, not v{model_version}")
        if prov.get(TEST_SPLIT_SHA) != split_sha:
            out.append(f"report was scored on test split {str(prov.get(TEST_SPLIT_SHA))[:12]}, "
                       f"not the current test split {split_sha[:12]}")
    return out


def require(records: Sequence[Mapping[str, Any]], report: Mapping[str, Any] | None, model_version: str,
            split_sha: str, what: str = "predictions") -> None:
    found = problems(records, report, model_version, split_sha, what)
    if found:
        raise RiskvaError("refusing to decide on stale evidence: " + "; ".join(found)
                          + " (materialize evaluation_report for this version again)")
