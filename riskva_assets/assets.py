"""The RisKVA asset graph: one chain per dataset version (partition).

    raw_metadata ─┬─ sft_jsonl ─┬─ base_model ─ lora_adapter ─ merged_model ─ registered_model
                  └─ sft_parquet┘                                               │
                                                evaluation_report ──────────────┘
                                                        │
                                                champion_promotion

Every asset is a thin wrapper over riskva_core: it computes its partition's paths
(riskva_core/paths.py), calls one core function, and returns a MaterializeResult
with metadata and a DataVersion from a content hash. Nothing is passed through an
IO manager: each asset reads its upstream's files at their partition-keyed paths.

The loop from the field (group ``feedback``, one partition per UTC day; issue 28):

    inference_log ─ production_drift ─ review_queue ─ labelstudio_tasks ─ reviewed_dataset (unpartitioned)
                                                                               │ writes datasets/<new version>/
                                                        new_dataset_sensor ────┘ → a new dataset_version chain

The assets live by group: data_assets.py, model_assets.py, registry_assets.py, feedback_assets.py and
review_assets.py; what they
share (code version, group names, Markdown helpers) is in asset_metadata.py.
"""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

from .data_assets import raw_metadata, sft_jsonl, sft_parquet
from .feedback_assets import inference_log, production_drift, review_queue
from .model_assets import base_model, lora_adapter, merged_model
from .registry_assets import champion_promotion, evaluation_report, registered_model
from .review_assets import labelstudio_tasks, reviewed_dataset

# One chain per dataset version (materialized together with a dataset_version partition key) ...
VERSION_ASSETS = [raw_metadata, sft_jsonl, sft_parquet, base_model, lora_adapter, merged_model, registered_model,
                  evaluation_report, champion_promotion]
# ... and the loop from the field, by UTC day (reviewed_dataset unpartitioned): never in one run with the chain.
FEEDBACK_ASSETS = [inference_log, production_drift, review_queue, labelstudio_tasks, reviewed_dataset]
ALL_ASSETS = VERSION_ASSETS + FEEDBACK_ASSETS
DATA_ASSETS = ["raw_metadata", "sft_jsonl", "sft_parquet"]
