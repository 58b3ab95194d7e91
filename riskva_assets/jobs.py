"""Jobs: the data refresh the sensor launches, the full retrain, and the manual promote/rollback."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

from enum import Enum

import dagster as dg
from pydantic import Field

from riskva_core.registry import promotion

from .assets import DATA_ASSETS
from .partitions import dataset_version
from .resources import MlflowResource

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.assets(*DATA_ASSETS),
    partitions_def=dataset_version,
    description="Validate and prepare one dataset version (launched by the datasets sensor).",
)

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("feedback"),
    partitions_def=dataset_version,
    description="The whole chain for one dataset version: data → train → merge → register → evaluate → promote.",
)


class Action(str, Enum):
    promote = "promote"
    rollback = "rollback"


class PromoteConfig(dg.Config):
    version: str = Field(default="", description="model version; rollback: empty means the previous champion")
    action: Action = Field(default=Action.promote, description="promote: make `version` champion; rollback: return")
    reason: str = Field(description="why: recorded on the version's tags")


@dg.op(description="Move the `champion` alias of model `riskva` by hand; the reason goes into the version tags.")
def move_champion(context: dg.OpExecutionContext, config: PromoteConfig, mlflow: MlflowResource) -> dict:
    registry = mlflow.registry()
    extra = {"dagster_run_id": context.run_id}
    if config.action == Action.promote:
        if not config.version:
            raise dg.Failure("promote needs a version")
        aliases = promotion.promote(registry, config.version, config.reason, extra)
    else:
        aliases = promotion.rollback(registry, config.reason, config.version or None, extra)
    context.log.info(f"{config.action.value}: aliases now {aliases}")
    context.add_output_metadata({"aliases": dg.MetadataValue.json(aliases), "reason": config.reason})
    return aliases


@dg.job(description="Manual promotion or rollback of the champion model (Launchpad: version, action, reason).")
def promote_job() -> None:
    move_champion()
