"""Resources: where data lives, where MLflow lives, how training is launched.

Each is a ``dg.ConfigurableResource`` whose fields can be set in the Launchpad or
from the environment with ``dg.EnvVar`` (see definitions.py):

    RISKVA_HOME                data root (default ./riskva_home)
    RISKVA_MLFLOW_TRACKING_URI default sqlite:///$RISKVA_HOME/mlflow/mlflow.db
    RISKVA_MLFLOW_REGISTRY_URI default: the tracking URI
    RISKVA_MLFLOW_ARTIFACT_ROOT artifact root for a database tracking URI (default $RISKVA_HOME/mlflow/artifacts)
    RISKVA_MLFLOW_UI_URL       link target in asset metadata (default http://127.0.0.1:5000)
    RISKVA_NUM_PROCESSES       training ranks (default 1)
    RISKVA_BASE_MODEL          base model: a folder, a hub id (from the HF cache; HF_HUB_OFFLINE honoured)
                               or a models:/ URI (default: build the demo tiny model)
    RISKVA_TRAIN_LAUNCHER      where lora_adapter trains: local (default) | ray | k8s (launch_resources.py)
    RISKVA_RAY_ADDRESS         the Ray cluster's dashboard/job address for the ray launcher, e.g. http://head:8265
    LABEL_STUDIO_URL           the review desk (default http://127.0.0.1:8089; `make labelstudio` starts one)
    LABEL_STUDIO_API_KEY       its API token (a secret: read through dg.EnvVar, never logged)
    LABEL_STUDIO_DOCUMENT_ROOT the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: the data root)
    RISKVA_MIN_REVIEWS         new reviews before review_progress_sensor requests reviewed_dataset (default 20)
"""
from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from riskva_core.paths import DataRoot, default_home
from riskva_core.registry.client import Registry

# The launcher resource lives with its Pipes clients (one direction: launch_resources never imports this).
from .launch_resources import TrainingLauncher

REPO_ROOT = Path(__file__).resolve().parents[1]
__all__ = ["REPO_ROOT", "DataRootResource", "MlflowResource", "TrainingLauncher"]


class DataRootResource(dg.ConfigurableResource):
    """The data root of riskva_core/paths.py; empty means $RISKVA_HOME or ./riskva_home."""

    root: str = Field(default="", description="Data root folder; empty: $RISKVA_HOME or ./riskva_home")

    def layout(self) -> DataRoot:
        return DataRoot(Path(self.root) if self.root else default_home())


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry; defaults to sqlite and local artifacts under the data root."""

    paths: DataRootResource
    tracking_uri: str = Field(default="", description="Empty: sqlite:///<root>/mlflow/mlflow.db")
    registry_uri: str = Field(default="", description="Empty: same as the tracking URI")
    ui_url: str = Field(default="http://127.0.0.1:5000", description="MLflow UI base URL for links")
    artifact_root: str = Field(
        default="", description="Artifact root (folder or URI) for a database tracking URI such as "
        "postgresql://…; empty: <root>/mlflow/artifacts. Ignored with an http:// tracking server, which "
        "stores artifacts itself")

    def registry(self) -> Registry:
        root = self.paths.layout()
        if self.tracking_uri:
            artifact_root = None
            if not self.tracking_uri.startswith(("http://", "https://", "databricks")):
                # A database backend keeps no artifacts: without a root MLflow would write ./mlruns in the cwd.
                artifact_root = self.artifact_root or str(root.mlflow_artifact_root)
            return Registry(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or None,
                            artifact_root=artifact_root, ui_url=self.ui_url)
        return Registry.under(root, registry_uri=self.registry_uri or None, ui_url=self.ui_url)
