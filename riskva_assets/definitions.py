"""The Dagster code location: ``dagster dev -m riskva_assets.definitions`` (or workspace.yaml).

Resources read the environment at run time through ``dg.EnvVar`` when the variable
is set (see resources.py for the list); unset variables fall back to the defaults
that keep everything under ./riskva_home.
"""
from __future__ import annotations

import os

import dagster as dg

from .assets import ALL_ASSETS
from .jobs import data_job, promote_job, retrain_job
from .resources import DataRootResource, MlflowResource, TrainingLauncher
from .review_assets import LabelStudioResource, daily_field, field_job, review_job, review_progress_sensor
from .schedules import weekly_retrain
from .sensors import new_dataset_sensor


def _env(name: str, default):
    """``dg.EnvVar(name)`` when set (shown as such in the UI), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def _env_int(name: str, default: int):
    return dg.EnvVar.int(name) if os.environ.get(name) else default


def build_resources() -> dict:
    paths = DataRootResource(root=_env("RISKVA_HOME", ""))
    return {
        "paths": paths,
        "mlflow": MlflowResource(
            paths=paths,
            tracking_uri=_env("RISKVA_MLFLOW_TRACKING_URI", ""),
            registry_uri=_env("RISKVA_MLFLOW_REGISTRY_URI", ""),
            ui_url=_env("RISKVA_MLFLOW_UI_URL", "http://127.0.0.1:5000"),
            artifact_root=_env("RISKVA_MLFLOW_ARTIFACT_ROOT", ""),
        ),
        "launcher": TrainingLauncher(
            num_processes=_env_int("RISKVA_NUM_PROCESSES", 0),  # 0: one rank per visible GPU
            base_model_path=_env("RISKVA_BASE_MODEL", ""),
            launcher=_env("RISKVA_TRAIN_LAUNCHER", "local"),
            ray_address=_env("RISKVA_RAY_ADDRESS", ""),
        ),
        # The review desk (make labelstudio); the token is read from the environment, shown by name only.
        "labelstudio": LabelStudioResource(
            url=_env("LABEL_STUDIO_URL", "http://127.0.0.1:8089"),
            api_key=_env("LABEL_STUDIO_API_KEY", ""),
            document_root=_env("LABEL_STUDIO_DOCUMENT_ROOT", ""),
        ),
    }


defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[data_job, retrain_job, promote_job, field_job, review_job],
    sensors=[new_dataset_sensor, review_progress_sensor],
    schedules=[weekly_retrain, daily_field],
    resources=build_resources(),
)
