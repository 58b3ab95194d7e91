"""Scoring a registered model on a prepared split exactly as it is served.

Evaluation loads the MLflow pyfunc (``models:/riskva@challenger``…) and feeds it the
same ``image`` table the HTTP server receives, so the report measures the served model,
its generation settings and image policy (``model_config``, ``image_policy.json``) included.
A sample whose image cannot be used becomes a record with ``error`` (scored as unparsed,
as ``riskva infer`` does) and the others are still answered; only a split where no image
can be answered at all is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from riskva_core.data.samples import read_samples
from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS, INPUT_COLUMN


def predict_split(model_uri: str, dataset_path: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """Batch inference of a registered model on a prepared split, as infer-style records.

    Records carry ``id``, ``image_path``, ``raw_output``, ``parsed``, ``parse_ok``,
    ``ground_truth`` and, for a sample that could not be answered, ``error``: the shape
    riskva_core.evaluate scores.
    """
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    samples = read_samples(dataset_path, split)
    if not samples:
        raise RiskvaError(f"{dataset_path}: the {split} split is empty; nothing to evaluate")
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({INPUT_COLUMN: [_sample_bytes(s) for s in samples]})
    try:
        out = model.predict(frame)
    except MlflowException as exc:  # over a limit, or no image answerable: nothing to score
        raise RiskvaError(f"{dataset_path} ({split}): {exc.message}") from None
    records = []
    for sample, row in zip(samples, out.to_dict("records")):
        error = row.get("error")
        rec = {
            "id": sample.id,
            "image_path": sample.image_path,
            "raw_output": row["raw_output"] if not error else None,
            "parsed": {f: (row[f] or None) for f in FIELDS},
            "parse_ok": bool(row["parse_ok"]),
            "ground_truth": dict(sample.fields),
        }
        if error:
            rec["error"] = f"sample {sample.id}: {error}"
        records.append(rec)
    return records


def _sample_bytes(sample: Any) -> bytes:
    """The stored bytes; an unreadable file becomes empty bytes, which the pyfunc reports per row."""
    try:
        return sample.image_data()
    except RiskvaError:
        return b""
