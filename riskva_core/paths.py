"""The data-root layout: where every step of the lifecycle reads and writes.

One folder, ``RISKVA_HOME`` (default ``./riskva_home`` relative to the current
directory), holds everything a run produces, so a whole deployment can be moved,
backed up or wiped as one unit, and the Dagster UI, the MLflow UI and the CLI
all agree on where things are::

    $RISKVA_HOME/
      datasets/<version>/metadata.csv      raw CSV (seed columns, see schema.py)
      datasets/<version>/images/...        the images the CSV references
      validation/<version>/                validation_report.json|.md of raw_metadata
      prepared/<version>/jsonl/            prepared SFT folder (see samples.py)
      prepared/<version>/parquet/          the same samples as Parquet
      models/<version>/base/               demo base model (tiny random Qwen2.5-VL)
      models/<version>/train/              LoRA training output (adapter, checkpoints)
      models/<version>/merged/             base + adapter merged, with merge_report.json
      reports/<version>/                   evaluation report.json|.md|.html, predictions
      field/photos/<sha256[:2]>/<sha256>.<ext>  served photos, stored once under their hash
      field/<kind>/<day>...                the loop from the field (feedback/): inference_log,
                                           drift, review_queue, per UTC day
      mlflow/mlflow.db                     MLflow tracking + registry (sqlite)
      mlflow/artifacts/                    MLflow artifact root
      dagster_home/                        DAGSTER_HOME: dagster.yaml + sqlite storage

``<version>`` is the dataset version: the name of a folder under ``datasets/`` and
the Dagster partition key. Versions are restricted to a safe alphabet so that a
key can never address a path outside the root.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from riskva_core.errors import RiskvaError

ENV_HOME = "RISKVA_HOME"
DEFAULT_HOME = "riskva_home"
DATASET_CSV = "metadata.csv"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_version(version: str) -> str:
    """Return ``version`` if it is a safe folder name, else raise a one-line error."""
    if not _VERSION_RE.match(version or "") or ".." in version:
        raise RiskvaError(
            f"dataset version {version!r}: use letters, digits, '.', '_' or '-' "
            "(at most 128, not starting with a separator)"
        )
    return version


def default_home() -> Path:
    """``$RISKVA_HOME`` or ``./riskva_home``, made absolute (Dagster needs absolute paths)."""
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser().resolve()


@dataclasses.dataclass(frozen=True)
class DataRoot:
    """Typed accessors over the layout above; nothing is created until a writer asks."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @classmethod
    def from_env(cls) -> "DataRoot":
        return cls(default_home())

    # --- datasets -------------------------------------------------------
    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    def dataset_dir(self, version: str) -> Path:
        return self.datasets / check_version(version)

    def dataset_csv(self, version: str) -> Path:
        return self.dataset_dir(version) / DATASET_CSV

    def dataset_versions(self) -> list[str]:
        """Versions with a ``metadata.csv``, sorted by name; half-copied folders are skipped."""
        if not self.datasets.is_dir():
            return []
        found = []
        for child in self.datasets.iterdir():
            if child.is_dir() and _VERSION_RE.match(child.name) and (child / DATASET_CSV).is_file():
                found.append(child.name)
        return sorted(found)

    def newest_dataset_version(self) -> str | None:
        """The version whose ``metadata.csv`` was modified last (name breaks ties)."""
        versions = self.dataset_versions()
        if not versions:
            return None
        return max(versions, key=lambda v: (self.dataset_csv(v).stat().st_mtime_ns, v))

    # --- derived data ---------------------------------------------------
    def validation_dir(self, version: str) -> Path:
        return self.root / "validation" / check_version(version)

    def prepared_dir(self, version: str, fmt: str) -> Path:
        if fmt not in ("jsonl", "parquet"):
            raise RiskvaError(f"prepared format {fmt!r}: expected 'jsonl' or 'parquet'")
        return self.root / "prepared" / check_version(version) / fmt

    def models_dir(self, version: str) -> Path:
        return self.root / "models" / check_version(version)

    def base_model_dir(self, version: str) -> Path:
        return self.models_dir(version) / "base"

    def train_dir(self, version: str) -> Path:
        return self.models_dir(version) / "train"

    def merged_dir(self, version: str) -> Path:
        return self.models_dir(version) / "merged"

    def reports_dir(self, version: str) -> Path:
        return self.root / "reports" / check_version(version)

    # --- the field (feedback/) -------------------------------------------
    @property
    def field_dir(self) -> Path:
        return self.root / "field"

    @property
    def field_photos(self) -> Path:
        """Photos the served model answered, one file per content hash (feedback/tracing.py)."""
        return self.field_dir / "photos"

    # --- services -------------------------------------------------------
    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"
