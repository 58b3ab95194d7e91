"""Reviewed field photos become the next dataset version: the earlier rows plus the reviewed photos.

The new version is an ordinary dataset folder in the seed's format (``metadata.csv`` with the
seed's columns, ``images/``), so the dataset sensor, validation, prepare and training take it as
they take any version; nothing downstream knows it came from the field. What is written:

- every row of the earlier CSV as it was (its extra columns too), and the images it references,
  at the same relative paths (hard links where the file system allows, copies otherwise): the
  earlier version's photos keep their split, since prepare reads the earlier split.json by content;
- one row per reviewed photo: ``image_id`` ``field-<sha256[:16]>``, the photo under
  ``images/field/<sha256[:16]>.<ext>``, and the inspector's four fields, normalised as validation
  normalises them;
- ``provenance.json``: for each added row, the reviewer, the review time, the model version whose
  draft was reviewed, the draft, which fields the inspector changed, the trace and task ids; and
  the photos left out with the reason (the same content already in the dataset, an incomplete
  review, a photo no longer kept).

The folder appears whole or not at all (``atomic.atomic_dir``), and an existing version is never
overwritten: a version is immutable once the sensor may have seen it.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from riskva_core import atomic
from riskva_core.data.images import ImagePathError, resolve_image_path
from riskva_core.data.raw_csv import read_raw_csv
from riskva_core.errors import RiskvaError
from riskva_core.feedback.reviews import Review
from riskva_core.registry.tracing import photo_extension
from riskva_core.paths import DATASET_CSV
from riskva_core.schema import CSV_COLUMNS, FIELD_LEVEL, FIELD_TO_COLUMN, FIELDS, LEVELS

PROVENANCE = "provenance.json"
FIELD_IMAGES = "images/field"


@dataclasses.dataclass(frozen=True)
class ReviewedDatasetConfig:
    previous_csv: Path  # the earlier version's metadata.csv
    previous_root: Path  # the folder its image paths are relative to
    reviews: Sequence[Review]
    output_dir: Path  # datasets/<new version>
    min_reviews: int = 1  # fewer usable reviews: nothing is written


@dataclasses.dataclass(frozen=True)
class ReviewedDatasetResult:
    path: Path
    csv_path: Path
    rows_previous: int
    rows_added: int
    skipped: list[dict[str, str]]
    changed: dict[str, int]  # field → added rows where the inspector changed it


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _place(source: Path, target: Path) -> None:
    """Hard link (no second copy of the bytes; files are never modified in place), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _incomplete(review: Review) -> str | None:
    final = review.final()
    if final[FIELD_LEVEL] not in LEVELS:
        return f"incomplete review: 风险等级 {final[FIELD_LEVEL]!r} is not one of {'/'.join(LEVELS)}"
    empty = [f for f in FIELDS if not final[f]]
    return f"incomplete review: {', '.join(empty)} empty" if empty else None


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_reviewed_dataset(config: ReviewedDatasetConfig) -> ReviewedDatasetResult:
    out = Path(config.output_dir)
    if out.exists():
        raise RiskvaError(f"{out} already exists: a dataset version is never overwritten (choose a new version)")
    previous, _, _ = read_raw_csv(config.previous_csv)
    if "image_id" not in previous.columns:  # as validation synthesises it: the row index
        previous.insert(0, "image_id", [str(i) for i in range(len(previous))])
    base = Path(config.previous_root).resolve()
    columns = [*CSV_COLUMNS, *(c for c in previous.columns if c not in CSV_COLUMNS)]
    rows = [{c: r.get(c, "") for c in columns} for r in previous.to_dict("records")]

    # The earlier images, once each, and their content hashes (a reviewed photo already in the data is skipped).
    sources: dict[str, Path] = {}
    for r in rows:
        try:
            sources.setdefault(r["image_path"], resolve_image_path(base, r["image_path"]))
        except ImagePathError:
            continue  # the earlier version's own rejection; the row is kept as it was and rejected again
    existing = {_sha256(p): rel for rel, p in sources.items() if p.is_file()}

    latest: dict[str, Review] = {}
    for review in sorted(config.reviews, key=lambda r: r.reviewed_at):
        latest[review.photo_sha256] = review  # reviewed twice: the last verdict stands
    added: list[tuple[Review, str, Path]] = []
    skipped: list[dict[str, str]] = []
    for sha, review in sorted(latest.items()):
        photo = Path(review.photo_path) if review.photo_path else None
        reason = None
        if sha in existing:
            reason = f"the same photo is already in the dataset ({existing[sha]})"
        elif photo is None or not photo.is_file():
            reason = "the photo is no longer kept (retention off or removed)"
        elif _sha256(photo) != sha:
            reason = "the stored photo's content does not match its hash"
        else:
            reason = _incomplete(review)
        if reason:
            skipped.append({"photo_sha256": sha, "reason": reason})
            continue
        with open(photo, "rb") as f:
            rel = f"{FIELD_IMAGES}/{sha[:16]}.{photo_extension(f.read(16))}"
        added.append((review, rel, photo))
    if len(added) < config.min_reviews:
        raise RiskvaError(f"{len(added)} usable reviewed photos, fewer than the {config.min_reviews} a new dataset "
                          f"version needs ({len(skipped)} left out); nothing written")

    provenance: list[dict[str, Any]] = []
    changed = {f: 0 for f in FIELDS}
    for review, rel, _ in added:
        final = review.final()
        row = {c: "" for c in columns}
        row.update({"image_id": f"field-{review.photo_sha256[:16]}", "image_path": rel,
                    **{FIELD_TO_COLUMN[f]: final[f] for f in FIELDS}})
        rows.append(row)
        fields_changed = review.changed_fields()
        for f in fields_changed:
            changed[f] += 1
        provenance.append({"image_path": rel, "image_id": row["image_id"], "photo_sha256": review.photo_sha256,
                           "reviewer": review.reviewer, "reviewed_at": review.reviewed_at,
                           "model_version": review.model_version, "draft": dict(review.draft),
                           "changed_fields": fields_changed, "trace_id": review.trace_id, "task_id": review.task_id})

    with atomic.atomic_dir(out) as tmp:
        for rel, source in sources.items():
            if source.is_file():
                _place(source, tmp / rel)
        for _, rel, photo in added:
            _place(photo, tmp / rel)
        (tmp / DATASET_CSV).write_text(_csv_text(columns, rows), encoding="utf-8")
        atomic.write_json(tmp / PROVENANCE, {
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "previous_csv": str(Path(config.previous_csv).resolve()),
            "previous_csv_sha256": _sha256(Path(config.previous_csv)),
            "rows_previous": len(previous), "rows_added": len(added), "changed": changed,
            "reviews": provenance, "skipped": skipped})
    return ReviewedDatasetResult(path=out, csv_path=out / DATASET_CSV, rows_previous=len(previous),
                                 rows_added=len(added), skipped=skipped, changed=changed)
