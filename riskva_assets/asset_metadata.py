"""What every asset shares: code versions, group names and the Markdown/metadata helpers."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import dagster as dg

from riskva_core.errors import RiskvaError

from .resources import REPO_ROOT

# The riskva_core source each asset runs (files or whole stage packages, relative to the repository).
# An asset's code_version is a hash of exactly these files, so editing e.g. riskva_core/train/ marks
# lora_adapter stale in the UI (and, through it, everything downstream), while an edit to the
# evaluation code leaves the trained model alone.
ASSET_SOURCES: dict[str, tuple[str, ...]] = {
    "raw_metadata": ("riskva_core/data/validate.py", "riskva_core/data/raw_csv.py", "riskva_core/data/images.py",
                     "riskva_core/schema.py"),
    "sft_jsonl": ("riskva_core/data", "riskva_core/schema.py"),
    "sft_parquet": ("riskva_core/data", "riskva_core/schema.py"),
    "base_model": ("riskva_core/model/tiny.py",),
    "lora_adapter": ("riskva_core/train", "riskva_core/data/samples.py", "riskva_core/model/loading.py",
                     "riskva_assets/pipes_train.py", "configs/deepspeed_zero2.yaml", "configs/ds_zero2.json"),
    "merged_model": ("riskva_core/model/merge.py", "riskva_core/model/loading.py"),
    "registered_model": ("riskva_core/registry/client.py", "riskva_core/registry/pyfunc.py",
                         "riskva_core/evaluate/infer.py", "riskva_core/evaluate/parse.py"),
    "evaluation_report": ("riskva_core/evaluate",),
    "champion_promotion": ("riskva_core/registry/promotion.py", "riskva_core/evaluate/metrics.py"),
}


def source_version(sources: Sequence[str], root: Path = REPO_ROOT) -> str:
    """sha256[:16] over (path, content) of the given files and every *.py under the given folders."""
    h = hashlib.sha256()
    for item in sources:
        target = root / item
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(f.read_bytes() if f.is_file() else b"<missing>")
            h.update(b"\0")
    return h.hexdigest()[:16]


CODE_VERSIONS: dict[str, str] = {key: source_version(src) for key, src in ASSET_SOURCES.items()}
DATA = "data"
MODEL = "model"
REGISTRY = "registry"
PREVIEW_ROWS = 5


def md_cell(value: Any, limit: int = 60) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rounded(value: Any, digits: int = 3) -> Any:
    """Metrics as the UI should show them: floats to ``digits`` decimals (recursively in lists/dicts)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, Mapping):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def confusion_table(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> dg.TableMetadataValue:
    """The report's confusion matrix (rows: true level, columns: predicted, in ``labels`` order) as a
    labelled table, which the UI renders as a grid instead of a nested list."""
    if len(matrix) != len(labels) or any(len(row) != len(labels) for row in matrix):
        raise RiskvaError(f"confusion matrix shape does not match its {len(labels)} labels")
    first = "truth \\ predicted"
    columns = [dg.TableColumn(first, "string")] + [dg.TableColumn(str(p), "int") for p in labels]
    records = [dg.TableRecord({first: str(t), **{str(p): int(n) for p, n in zip(labels, row)}})
               for t, row in zip(labels, matrix)]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def upstream_metadata(context: dg.AssetExecutionContext, key: str) -> dict[str, Any]:
    """Metadata values of an upstream asset's latest materialization of this partition."""
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[context.partition_key]), limit=1
    )
    if not result.records or result.records[0].asset_materialization is None:
        raise RiskvaError(f"{key} has no materialization for partition {context.partition_key!r}; materialize it first")
    return {k: getattr(v, "value", v) for k, v in result.records[0].asset_materialization.metadata.items()}
