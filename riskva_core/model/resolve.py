"""Where a model reference points: a local folder, a Hugging Face hub id, or an MLflow model URI.

Every entry point (train, merge, infer, registry, the Dagster resources) accepts all three and
turns them into a local folder here, so ``Qwen/Qwen2.5-VL-7B-Instruct`` works wherever a folder
does. A hub id is resolved by ``huggingface_hub.snapshot_download`` itself: it reads the cache
(``HF_HUB_CACHE``/``HF_HOME``) and honours ``HF_HUB_OFFLINE`` (offline: the cached snapshot that
``refs/main`` names, never the network). A registered RisKVA model is an MLflow pyfunc whose merged model folder travels as the
artifact ``model_dir``; every entry point that accepts ``models:/riskva@champion`` downloads
it here, so inference, evaluation and serving agree on the layout without importing the
registry package (which itself depends on inference).

Pinning (:func:`pin_model_ref`): a run that starts several processes (every training rank, then
the merge) must not let each of them look the reference up again: ``models:/riskva@champion``
can move, and the hub's ``refs/main`` can advance, between two of those look-ups. The Dagster
assets pin a reference once: an MLflow alias (or ``latest``) to its version number, downloaded
once into a folder of its own; a hub id to its snapshot commit. They then hand the processes
``RISKVA_PINNED_MODELS`` (JSON: reference → local folder), which :func:`resolve_model_ref`
reads before anything else, so every process loads exactly the pinned copy while the adapter
still records the portable name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from riskva_core.errors import RiskvaError

ADAPTER_CONFIG = "adapter_config.json"
PINS_ENV = "RISKVA_PINNED_MODELS"  # JSON {reference: local folder}: set by whoever pinned the references
PIN_FILE = "riskva_pin.json"  # beside a pinned MLflow download: what it is a copy of
ARTIFACT_MODEL_DIR = "model_dir"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# What a model folder needs; a hub download fetches only these (no .bin/.pt pickles, no extras).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "merges.txt", "vocab.json")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_hub_id(ref: str) -> bool:
    """``owner/name`` that is not an existing path and not written as one (./x, /x, ~/x)."""
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1 or Path(ref).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def resolve_model_ref(ref: str | os.PathLike, flag: str = "--model_name_or_path") -> Path:
    """A local folder for ``ref`` (folder or hub id); RiskvaError naming ``flag`` and what was tried.

    An MLflow URI is downloaded (:func:`download_mlflow_model`) into a temporary folder that is
    removed when the process exits; callers that free the weights earlier call that function
    themselves and remove the folder once the model is in memory (inference does).
    """
    text = str(ref)
    pinned = _pins().get(text)
    if pinned is not None:
        if not Path(pinned).is_dir():
            raise RiskvaError(f"{flag} {text}: pinned to {pinned} ({PINS_ENV}), which is not a folder")
        return Path(pinned)
    if text.startswith(MLFLOW_SCHEMES):
        import atexit

        local, dst = download_mlflow_model(text, flag)
        atexit.register(shutil.rmtree, dst, True)
        return local
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if not is_hub_id(text):
        raise RiskvaError(f"{flag} {text}: no such model folder (and not a hub id of the form owner/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(text, allow_patterns=list(HUB_PATTERNS), local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        how = "HF_HUB_OFFLINE=1, so only the local cache was read" if offline else "the hub was asked too"
        raise RiskvaError(f"{flag} {text}: not a local folder and not in the Hugging Face cache "
                          f"{constants.HF_HUB_CACHE} ({how}: {type(exc).__name__})") from None


def _pins() -> dict[str, str]:
    raw = os.environ.get(PINS_ENV)
    if not raw:
        return {}
    try:
        pins = json.loads(raw)
    except json.JSONDecodeError:
        raise RiskvaError(f"{PINS_ENV} is not JSON: {raw[:80]}") from None
    if not isinstance(pins, dict):
        raise RiskvaError(f"{PINS_ENV} must map model references to folders, got {type(pins).__name__}")
    return {str(k): str(v) for k, v in pins.items()}


def mlflow_uris() -> tuple[str, str]:
    """(tracking URI, registry URI), named explicitly rather than through mlflow's process-wide URI,
    which whatever ran earlier in the process may have pointed at another registry."""
    from riskva_core.paths import DataRoot

    tracking = (os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("RISKVA_MLFLOW_TRACKING_URI")
                or DataRoot.from_env().mlflow_tracking_uri)
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("RISKVA_MLFLOW_REGISTRY_URI") or tracking
    return tracking, registry


def download_mlflow_model(uri: str, flag: str = "--model_path") -> tuple[Path, Path]:
    """Download an MLflow model; return (merged model folder inside it, download folder)."""
    import mlflow
    import yaml

    tracking, registry = mlflow_uris()
    dst = Path(tempfile.mkdtemp(prefix="riskva-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking,
                                                         registry_uri=registry))
    except Exception as exc:  # MlflowException, RestException, OSError…: all mean "cannot get it"
        shutil.rmtree(dst, ignore_errors=True)
        raise RiskvaError(f"{flag} {uri}: cannot download from MLflow ({str(exc).splitlines()[0]})") from None
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
        raise RiskvaError(f"{flag} {uri}: the MLflow model has no '{ARTIFACT_MODEL_DIR}' model folder")
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
