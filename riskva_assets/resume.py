"""Resume on retry and the adapter's lineage record, for ``lora_adapter``, ``merged_model`` and
``registered_model``: the Dagster-free logic lives in riskva_core/launch/resume.py (read its
docstring); these are its names where the asset layer (and pipes_train, the launchers) import them.

Kept out of the assets' code versions on purpose: how a run is resumed or recorded does not
change the weights it produces (riskva_assets modules are not hashed; asset_metadata.py).
"""
from __future__ import annotations

from riskva_core.launch.resume import (COMPLETE_FILE, IDENTITY_FILE, LINEAGE_FILE, NEUTRAL_FIELDS, RESULT_DIRS,
                                       RESUME_FLAG, SAVE_FIELDS, STOPPED_FILE, SUPERSEDED_DIR, ResumePlan,
                                       adapter_version, checkpoints, config_files_digest, finished_run_record,
                                       has_checkpoint, identity_sha256, launcher_config_files, lineage_differences,
                                       lineage_tags, mark_complete, newest_superseded_lineage, plan_resume,
                                       read_lineage, run_identity, supersede, train_config, with_resume,
                                       write_lineage)

__all__ = ["COMPLETE_FILE", "IDENTITY_FILE", "LINEAGE_FILE", "NEUTRAL_FIELDS", "RESULT_DIRS", "RESUME_FLAG",
           "SAVE_FIELDS", "STOPPED_FILE", "SUPERSEDED_DIR", "ResumePlan", "adapter_version", "checkpoints",
           "config_files_digest", "finished_run_record", "has_checkpoint", "identity_sha256",
           "launcher_config_files", "lineage_differences", "lineage_tags", "mark_complete",
           "newest_superseded_lineage", "plan_resume", "read_lineage", "run_identity", "supersede", "train_config",
           "with_resume", "write_lineage"]
