"""What every asset shares: code versions, group names and the Markdown/metadata helpers."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import ast
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import dagster as dg

from riskva_core.errors import RiskvaError

from .resources import REPO_ROOT

# An asset's code_version is a hash of the riskva_core source its function really reaches: the
# imports inside the asset function, inside the same-module helpers it calls, and of the module
# names it uses, followed through riskva_core (riskva_core/import_graph.py, read with ast). So
# editing riskva_core/train/ marks lora_adapter stale in the UI (and, through it, everything
# downstream) while an edit to the evaluation code leaves the trained model alone, and the list
# cannot drift from the code. The Dagster layer (riskva_assets modules: metadata, resources,
# lineage plumbing) is not hashed nor followed: it does not change what an asset produces.
# What a function reaches other than by import:
ASSET_MODULES = ("riskva_assets/data_assets.py", "riskva_assets/model_assets.py", "riskva_assets/registry_assets.py",
                 "riskva_assets/feedback_assets.py", "riskva_assets/review_assets.py")
# lora_adapter: the training every rank runs (riskva_assets/pipes_rank.py calls it). The launch package
# itself (how ranks are started, report and resume) does not change the weights and is not hashed.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {"lora_adapter": ("riskva_core.train.sft",)}
EXTRA_FILES: dict[str, tuple[str, ...]] = {"lora_adapter": ("configs/deepspeed_zero2.yaml", "configs/ds_zero2.json")}


def _asset_functions(module: Path) -> dict[str, str]:
    """asset key → function name, for each ``@dg.asset`` function of ``module`` (read, not imported)."""
    found = {}
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            target = call.func if call else deco
            if isinstance(target, ast.Attribute) and target.attr == "asset" or getattr(target, "id", "") == "asset":
                names = [k.value.value for k in (call.keywords if call else [])
                         if k.arg == "name" and isinstance(k.value, ast.Constant)]
                found[names[0] if names else node.name] = node.name
    return found


def asset_sources(root: Path = REPO_ROOT) -> dict[str, tuple[str, ...]]:
    """asset key → the repository files (relative) its code_version hashes."""
    from riskva_core.import_graph import closure, function_closure

    sources = {}
    for module in ASSET_MODULES:
        for key, function in _asset_functions(root / module).items():
            files, _ = function_closure(root / module, function, root, follow=("riskva_core",))
            extra = EXTRA_MODULES.get(key, ())
            files |= closure(extra, root, follow=("riskva_core", *extra))[0]
            core = {f.relative_to(root).as_posix() for f in files if f.relative_to(root).parts[0] == "riskva_core"}
            sources[key] = tuple(sorted(core | set(EXTRA_FILES.get(key, ()))))
    return sources


ASSET_SOURCES: dict[str, tuple[str, ...]] = asset_sources()


def source_version(sources: Sequence[str], root: Path = REPO_ROOT) -> str:
    """sha256[:16] over (path, meaning) of the given files and every *.py under the given folders:
    Python files by their syntax tree without docstrings, config files as parsed data, so an edit to
    comments or docstrings keeps the code version (riskva_core/launch/resume.py)."""
    from riskva_core.launch.resume import source_version as meaning_version

    return meaning_version(sources, root)


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
