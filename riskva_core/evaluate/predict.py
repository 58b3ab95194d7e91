"""Scoring a registered model on a prepared split exactly as it is served.

Evaluation loads the MLflow pyfunc (``models:/riskva@challenger``…) and feeds it the
same ``image`` table the HTTP server receives, so the report measures the served model,
its generation settings (``model_config``) included.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from riskva_core.data.samples import read_samples
from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS, INPUT_COLUMN


def predict_split(model_uri: str, dataset_path: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """Batch inference of a registered model on a prepared split, as infer-style records.

    Records carry ``id``, ``image_path``, ``raw_output``, ``parsed``, ``parse_ok`` and
    ``ground_truth``: the shape riskva_core.evaluate scores.
    """
    import mlflow
    import pandas as pd

    samples = read_samples(dataset_path, split)
    if not samples:
        raise RiskvaError(f"{dataset_path}: the {split} split is empty; nothing to evaluate")
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({INPUT_COLUMN: [_sample_bytes(s) for s in samples]})
    out = model.predict(frame)
    records = []
    for sample, row in zip(samples, out.to_dict("records")):
        records.append({
            "id": sample.id,
            "image_path": sample.image_path,
            "raw_output": row["raw_output"],
            "parsed": {f: (row[f] or None) for f in FIELDS},
            "parse_ok": bool(row["parse_ok"]),
            "ground_truth": dict(sample.fields),
        })
    return records


def _sample_bytes(sample: Any) -> bytes:
    if sample.image_bytes is not None:
        return sample.image_bytes
    return Path(sample.image_file).read_bytes()
