"""What every asset shares: code version, group names and the Markdown/metadata helpers."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import json
from pathlib import Path
from typing import Any

import dagster as dg

from riskva_core.errors import RiskvaError


CODE_VERSION = "1"
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
