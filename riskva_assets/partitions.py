"""One partition per dataset version: a folder under ``$RISKVA_HOME/datasets/``."""
from __future__ import annotations

import dagster as dg

DATASET_VERSION = "dataset_version"

# Shared by every asset of the chain, so a version's lineage reads down one column.
dataset_version = dg.DynamicPartitionsDefinition(name=DATASET_VERSION)
