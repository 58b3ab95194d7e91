"""Content hashes, upstream data versions and code identity for asset lineage."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import dagster as dg

from .resources import REPO_ROOT

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def folder_hash(folder: Path, patterns: tuple[str, ...] = ("*",), skip_dirs: tuple[str, ...] = ()) -> str:
    """sha256 over (relative path, file sha256) of the matching files, in sorted order."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in folder.rglob(pat) if p.is_file()})
    for p in files:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or (rel.parts and rel.parts[0] in skip_dirs):
            continue
        h.update(f"{rel.as_posix()}\t{file_sha256(p)}\n".encode())
    return h.hexdigest()


def text_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def upstream_data_versions(context: dg.AssetExecutionContext, keys: list[str]) -> dict[str, str]:
    """The data version of each upstream asset's latest materialization of this partition."""
    out: dict[str, str] = {}
    for key in keys:
        result = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[context.partition_key]),
            limit=1,
        )
        if result.records:
            mat = result.records[0].asset_materialization
            version = (mat.tags or {}).get("dagster/data_version") if mat else None
            if version:
                out[key] = version
    return out


# What an adapter is trained on, read directly (the prepared data, the pinned base), and what the
# prepared data was built from: the validated data as it was when sft_jsonl was last materialized
# (raw_metadata's newest materialization before it), not raw_metadata's latest, which may be newer
# than the prepared folder the run read.
TRAINED_ON = ("sft_jsonl", "base_model")
BUILT_FROM = {"sft_jsonl": ("raw_metadata",)}


def _latest(context: dg.AssetExecutionContext, key: str, before: int | None = None):
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[context.partition_key],
                              before_storage_id=before), limit=1)
    return result.records[0] if result.records else None


def trained_on_versions(context: dg.AssetExecutionContext) -> dict[str, str]:
    """Data versions an adapter trained now reads: :data:`TRAINED_ON` (latest materializations of
    this partition) and :data:`BUILT_FROM` (as they were when those were materialized)."""
    out = upstream_data_versions(context, list(TRAINED_ON))
    for key, sources in BUILT_FROM.items():
        built = _latest(context, key)
        for source in sources:
            record = _latest(context, source, before=built.storage_id) if built is not None else None
            mat = record.asset_materialization if record is not None else None
            version = (mat.tags or {}).get("dagster/data_version") if mat else None
            if version:
                out[source] = version
    return dict(sorted(out.items()))


def git_commit() -> str | None:
    """The repository's HEAD commit (with '+dirty' for local changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
