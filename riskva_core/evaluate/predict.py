"""Scoring a registered model on a prepared split exactly as it is served.

Evaluation loads the MLflow pyfunc (``models:/riskva@challenger``…) and feeds it the
same ``image`` table the HTTP server receives, so the report measures the served model,
its generation settings and image policy (``model_config``, ``image_policy.json``) included.
A sample whose image cannot be used becomes a record with ``error`` (scored as unparsed,
as ``riskva infer`` does) and the others are still answered; only a split where no image
can be answered at all is an error. Only what a photo causes becomes such a record
(``infer.run_items``): any other exception in the served model is a bug, and evaluation stops
with its traceback instead of scoring it as wrong answers.

A device out-of-memory error is an infrastructure failure, not a wrong answer: the pyfunc
refuses the request as ``TEMPORARILY_UNAVAILABLE`` (never as per-row errors), and evaluation
stops with an error saying so instead of scoring the samples as unparsed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from riskva_core.data.samples import read_samples
from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS, INPUT_COLUMN


def predict_split(model_uri: str, dataset_path: str | Path, split: str = "test",
                  generation: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Batch inference of a registered model on a prepared split, as infer-style records.

    ``generation``, when given, is filled with the decoding settings the served model used.
    Records carry ``id``, ``image_path``, ``raw_output``, ``parsed``, ``parse_ok``,
    ``ground_truth``, ``group`` (split.json's near-duplicate group; None without one) and, for a
    sample that could not be answered, ``error``: the shape
    riskva_core.evaluate scores.
    """
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from riskva_core.data.groups import recorded_groups

    samples = read_samples(dataset_path, split)
    groups = recorded_groups(dataset_path)
    if not samples:
        raise RiskvaError(f"{dataset_path}: the {split} split is empty; nothing to evaluate")
    model = mlflow.pyfunc.load_model(model_uri)
    if generation is not None:
        generation.update(served_generation_settings(model))
    config = dict(getattr(model, "model_config", None) or {})
    images = [_sample_bytes(s) for s in samples]
    rows: list[dict[str, Any]] = []
    # The served model refuses requests over its own limits; evaluation sends what a client may.
    for chunk in _chunks(images, int(config.get("max_rows") or len(images)),
                         int(config.get("max_request_bytes") or 0)):
        try:
            out = model.predict(pd.DataFrame({INPUT_COLUMN: chunk}))
        except MlflowException as exc:
            if exc.error_code == "TEMPORARILY_UNAVAILABLE":
                raise RiskvaError(f"{model_uri} on {dataset_path} ({split}): infrastructure error, evaluation "
                                  f"stopped and nothing scored: {exc.message}") from None
            # no image of the chunk answerable: nothing to score
            raise RiskvaError(f"{dataset_path} ({split}): {exc.message}") from None
        rows.extend(out.to_dict("records"))
    records = []
    for sample, row in zip(samples, rows):
        error = row.get("error")
        rec = {
            "id": sample.id,
            "image_path": sample.image_path,
            "raw_output": row["raw_output"] if not error else None,
            "parsed": {f: (row[f] or None) for f in FIELDS},
            "parse_ok": bool(row["parse_ok"]),
            "ground_truth": dict(sample.fields),
            "group": groups.get(sample.id),  # near-duplicate group: the unit the bootstrap resamples
        }
        if error:
            rec["error"] = f"sample {sample.id}: {error}"
        records.append(rec)
    return records


def served_generation_settings(model: Any) -> dict[str, Any]:
    """The loaded pyfunc's decoding settings (infer.Generator's), or {} for another kind of model."""
    try:
        generator = getattr(model.unwrap_python_model(), "_generator", None)
    except Exception:  # not a RisKVA python model
        return {}
    return dict(getattr(generator, "generation_settings", None) or {})


def _chunks(images: list[bytes], max_rows: int, max_bytes: int) -> list[list[bytes]]:
    """Consecutive requests of at most ``max_rows`` images and (when set) ``max_bytes`` bytes."""
    chunks: list[list[bytes]] = [[]]
    size = 0
    for image in images:
        if chunks[-1] and (len(chunks[-1]) >= max_rows or (max_bytes and size + len(image) > max_bytes)):
            chunks.append([])
            size = 0
        chunks[-1].append(image)
        size += len(image)
    return chunks


def _sample_bytes(sample: Any) -> bytes:
    """The stored bytes; an unreadable file becomes empty bytes, which the pyfunc reports per row."""
    try:
        return sample.image_data()
    except RiskvaError:
        return b""
