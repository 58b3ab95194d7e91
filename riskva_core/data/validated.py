"""Validate once per data version: the validated records, their hashes and normalised JPEGs, kept.

``raw_metadata`` validates a dataset version with prepare's encoding (one decode per image:
checks, content hash, perceptual hash and the normalised JPEG) and saves the result here:
``<validation dir>/validated_records.json`` plus the JPEGs under ``encoded/``. The prepared
assets (``sft_jsonl``, ``sft_parquet``) load it and decode nothing. The saved result is only
reused when it is for the same CSV bytes, dataset folder, pixel limit and encoding settings
and every JPEG it names is there; otherwise ``load`` returns None and prepare validates itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from riskva_core import atomic
from riskva_core.data.images import EncodeSpec, ImageReport
from riskva_core.data.validate import ValidationResult, ValidRecord

RECORDS_JSON = "validated_records.json"
ENCODED_DIR = "encoded"
FORMAT_VERSION = 2  # 2: pHash families (groups.CROP_SCALES); a saved one-hash result is validated again


def encoded_dir(folder: str | Path) -> Path:
    return Path(folder) / ENCODED_DIR


def _key(csv_sha256: str, image_base_path: str | Path, max_pixels: int, spec: EncodeSpec) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "csv_sha256": csv_sha256,
            "image_base_path": str(Path(image_base_path).resolve()), "max_image_pixels": int(max_pixels),
            "max_image_size": list(spec.max_size), "image_quality": int(spec.quality)}


def save(result: ValidationResult, folder: str | Path, max_pixels: int, spec: EncodeSpec) -> Path:
    """Write the records of ``result`` (validated with ``spec`` into ``encoded_dir(folder)``)."""
    report = result.report
    payload = {
        "key": _key(report["csv_sha256"], report["image_base_path"], max_pixels, spec),
        "report": report,
        "passed": result.passed,
        "records": [
            {**{k: getattr(r, k) for k in ("row", "image_id", "image_path", "image_sha256", "fields", "extra")},
             "image_file": str(r.image_file), "image": dataclasses.asdict(r.image)}
            for r in result.records
        ],
    }
    path = Path(folder) / RECORDS_JSON
    atomic.write_json(path, payload)
    if Path(spec.out_dir).resolve() == encoded_dir(folder).resolve():  # JPEGs of an earlier CSV: not needed
        used = {r.image.encoded_name for r in result.records}
        for f in encoded_dir(folder).iterdir():
            if f.name not in used:
                f.unlink()
    return path


def load(folder: str | Path, csv_path: str | Path, image_base_path: str | Path, max_pixels: int,
         spec: EncodeSpec) -> ValidationResult | None:
    """The saved validation of exactly this input and these settings, else None."""
    path = Path(folder) / RECORDS_JSON
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        csv_sha = hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()
    except (OSError, json.JSONDecodeError):
        return None
    if payload.get("key") != _key(csv_sha, image_base_path, max_pixels, spec):
        return None
    enc = encoded_dir(folder)
    records = []
    for r in payload["records"]:
        # JSON has no tuples: the sizes come back as lists.
        image = ImageReport(**{k: tuple(v) if k.endswith("size") and v is not None else v
                               for k, v in r["image"].items()})
        if not image.encoded_name or not (enc / image.encoded_name).is_file():
            return None
        records.append(ValidRecord(row=r["row"], image_id=r["image_id"], image_path=r["image_path"],
                                   image_file=Path(r["image_file"]), image_sha256=r["image_sha256"],
                                   fields=r["fields"], extra=r["extra"], image=image))
    return ValidationResult(records=records, report=payload["report"], passed=bool(payload["passed"]))
