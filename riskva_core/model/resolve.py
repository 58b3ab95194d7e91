"""Where a model reference points: a local folder, or an MLflow model URI.

A registered RisKVA model is an MLflow pyfunc whose merged model folder travels as the
artifact ``model_dir``; every entry point that accepts ``models:/riskva@champion`` downloads
it here, so inference, evaluation and serving agree on the layout without importing the
registry package (which itself depends on inference).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from riskva_core.errors import RiskvaError
from riskva_core.model.loading import ADAPTER_CONFIG

ARTIFACT_MODEL_DIR = "model_dir"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def download_mlflow_model(uri: str) -> tuple[Path, Path]:
    """Download an MLflow model; return (merged model folder inside it, download folder)."""
    import mlflow
    import yaml

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from riskva_core.paths import DataRoot

        mlflow.set_tracking_uri(DataRoot.from_env().mlflow_tracking_uri)
    dst = Path(tempfile.mkdtemp(prefix="riskva-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:  # MlflowException, RestException, OSError…: all mean "cannot get it"
        shutil.rmtree(dst, ignore_errors=True)
        raise RiskvaError(f"--model_path {uri}: cannot download from MLflow ({str(exc).splitlines()[0]})") from None
    if (local / "config.json").is_file():
        return local, dst
    rel = f"artifacts/{ARTIFACT_MODEL_DIR}"
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        art = (((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}).get(ARTIFACT_MODEL_DIR)
        if isinstance(art, dict) and art.get("path"):
            rel = art["path"]
    model_dir = (local / rel).resolve()
    if not model_dir.is_relative_to(local.resolve()) or not (model_dir / "config.json").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        raise RiskvaError(f"--model_path {uri}: the MLflow model has no '{ARTIFACT_MODEL_DIR}' model folder")
    return model_dir, dst


def adapter_base(adapter_dir: Path) -> str:
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RiskvaError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read ({exc})") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise RiskvaError(f"{adapter_dir}: adapter_config.json names no base model; pass it as --model_path")
    return str(base)
