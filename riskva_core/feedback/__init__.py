"""The loop from the field back to training, Dagster-free (issue 28).

- (the serving side lives where the servers are: registry/tracing.py writes one MLflow trace per
  served request and stores each photo once under its hash; evaluate/confidence.py reads the
  风险等级 confidence from the model's own token probabilities. Stages may not import feedback.)
- inference_log: a day's traces as a Parquet table;
- drift: a day's photos and answers against the champion's test split (named two-sample tests);
- review_queue: which field photos an inspector sees first (hard cases plus a seeded random share);
- labelstudio: the review desk's HTTP API (project, local storage, tasks with the model's draft);
- reviews: one inspector's verdict on a draft, and which fields it changed;
- reviewed_dataset: the earlier dataset version plus the reviewed photos, as a new version;
- field_accuracy: the share of drafts accepted unchanged, with an interval.

Import rule (tests/test_layout.py): feedback may use data, model, evaluate and registry; no stage
imports feedback (only riskva_assets does).
"""
