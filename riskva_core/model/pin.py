"""Pin a model reference once, so every process of a run loads the same weights.

    pin_model_ref("models:/riskva@champion", download_dir)  → version 3, downloaded once
    pin_model_ref("Qwen/Qwen2.5-VL-7B-Instruct")             → snapshot commit cc59…, its cache folder
    pin_model_ref("/models/base")                             → the folder itself

A training run starts several processes (one per rank, then the merge). If each looked the
reference up itself, an MLflow alias moved by a promotion, or a hub ``refs/main`` advanced by a
download, between two of those look-ups would train on one model and merge into another; and each
rank would download a 15 GB MLflow model again. The caller (the Dagster assets) pins once, records
the pin in the adapter's lineage and the registry tags, and hands the processes
``PinnedModel.env()`` (riskva_core.model.resolve reads it before anything else).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from riskva_core.errors import RiskvaError
from riskva_core.model.resolve import (MLFLOW_SCHEMES, PIN_FILE, PINS_ENV, mlflow_uris, download_mlflow_model,
                                       is_hub_id, resolve_model_ref)


@dataclasses.dataclass(frozen=True)
class PinnedModel:
    """``ref`` as asked; ``pinned_ref`` what the processes are told (the same reference, or for an MLflow
    alias ``models:/NAME/VERSION``); ``local_path`` the copy they all load; ``revision`` the hub commit
    or the MLflow version (None for a plain folder)."""

    ref: str
    kind: str  # folder | hub | mlflow
    pinned_ref: str
    local_path: str
    revision: str | None = None

    @property
    def identity(self) -> str:
        """What a run trained on, in one string (part of the run identity and the registry tags)."""
        return f"{self.pinned_ref}@{self.revision}" if self.kind == "hub" else self.pinned_ref

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "identity": self.identity}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PinnedModel":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    def env(self) -> dict[str, str]:
        """Environment for processes that should load ``pinned_ref`` from the pinned copy."""
        if self.kind == "folder":
            return {}
        return {PINS_ENV: json.dumps({self.pinned_ref: self.local_path}, ensure_ascii=False)}


def pin_model_ref(ref: str, download_dir: Path | None = None, flag: str = "--base_model_path") -> PinnedModel:
    """Resolve ``ref`` to a fixed version and a local copy (see the module docstring).

    An MLflow model is downloaded into ``download_dir`` (kept: later processes load it from there);
    a folder already holding the same pinned version is reused instead of downloaded again.
    """
    text = str(ref)
    if text.startswith(MLFLOW_SCHEMES):
        if download_dir is None:
            raise RiskvaError(f"{flag} {text}: pinning an MLflow model needs a folder to download it into")
        return _pin_mlflow(text, Path(download_dir), flag)
    local = Path(text).expanduser()
    if local.is_dir():
        return PinnedModel(ref=text, kind="folder", pinned_ref=text, local_path=str(local.resolve()))
    if not is_hub_id(text):
        raise RiskvaError(f"{flag} {text}: no such model folder (and not a hub id of the form owner/name)")
    # snapshot_download names the folder by the commit that refs/main (or the hub) points at now.
    snapshot = resolve_model_ref(text, flag)
    return PinnedModel(ref=text, kind="hub", pinned_ref=text, local_path=str(snapshot), revision=snapshot.name)


def _pin_mlflow(uri: str, download_dir: Path, flag: str) -> PinnedModel:
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    pinned, version = uri, None
    if uri.startswith("models:/"):
        tracking, registry = mlflow_uris()
        try:
            name_version = get_model_name_and_version(MlflowClient(tracking, registry), uri)
        except Exception as exc:  # MlflowException, RestException: the alias or model does not exist
            raise RiskvaError(f"{flag} {uri}: cannot resolve in MLflow ({str(exc).splitlines()[0]})") from None
        if len(name_version) == 2:
            version = str(name_version[1])
            pinned = f"models:/{name_version[0]}/{version}"
    record = PinnedModel(ref=uri, kind="mlflow", pinned_ref=pinned, local_path=str(download_dir.resolve()),
                         revision=version)
    try:
        done = json.loads((download_dir / PIN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        done = None
    if done and done.get("pinned_ref") == pinned and (download_dir / "config.json").is_file():
        return record  # this very version is already here: no second 15 GB download
    from riskva_core.atomic import atomic_dir, write_json

    model_dir, tmp = download_mlflow_model(pinned, flag)
    try:
        with atomic_dir(download_dir) as staging:
            for item in model_dir.iterdir():
                shutil.move(str(item), str(staging / item.name))
            write_json(staging / PIN_FILE, record.to_dict())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record

