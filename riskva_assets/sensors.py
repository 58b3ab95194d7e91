"""Sensor: a new or changed dataset folder becomes a partition and gets validated and prepared."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import hashlib
import json
from pathlib import Path

import dagster as dg

from .jobs import data_job
from .partitions import DATASET_VERSION
from .resources import DataRootResource


def folder_fingerprint(folder: Path) -> str:
    """sha256[:16] of the CSV's bytes and the listing (path, size, mtime) of every other file.

    Cheap enough to run every minute (only the CSV is read), and it changes when images
    arrive after the CSV, so a version first seen incomplete is tried again once complete.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):  # partial uploads, editor swap files
            continue
        if rel.as_posix() == "metadata.csv":
            h.update(b"csv\0" + hashlib.sha256(path.read_bytes()).digest())
        else:
            st = path.stat()
            h.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dg.sensor(
    job=data_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches $RISKVA_HOME/datasets: each new folder with a metadata.csv is added as a "
    "dataset_version partition and its data assets (raw_metadata, sft_jsonl, sft_parquet) are requested. "
    "Run keys and the cursor carry the folder's content fingerprint (CSV bytes + file listing), so a "
    "folder whose CSV arrived before its images is requested again once the images are there.",
)
def new_dataset_sensor(context: dg.SensorEvaluationContext, paths: DataRootResource) -> dg.SensorResult | dg.SkipReason:
    root = paths.layout()
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    on_disk = {v: folder_fingerprint(root.dataset_dir(v)) for v in root.dataset_versions()}
    known = set(context.instance.get_dynamic_partitions(DATASET_VERSION))
    new = sorted(v for v in on_disk if v not in known)
    changed = sorted(v for v, fp in on_disk.items() if v in known and seen.get(v) not in (None, fp))
    # A partition added by hand or by the demo has no cursor entry: remember it without a run.
    cursor = json.dumps({**seen, **on_disk}, sort_keys=True)
    if not new and not changed:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"no new or changed dataset folder ({len(on_disk)} on disk, all registered and unchanged)"), cursor=cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=v, run_key=f"data-{v}-{on_disk[v]}",
                                    tags={"riskva/dataset_fingerprint": on_disk[v]}) for v in new + changed],
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(DATASET_VERSION, new)] if new else [],
        cursor=cursor,
    )
