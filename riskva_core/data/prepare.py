"""Raw CSV → validated, split, self-contained SFT dataset (JSONL + images, or Parquet).

``riskva prepare`` runs ``validate`` first; each image is decoded once, in a worker
process, and re-encoded as a normalised JPEG (EXIF applied, RGB, fit within
--max_image_size, never upscaled, fixed encoder settings). The same JPEG bytes go to
JSONL's ``images/<sha256[:16]>.jpg`` and to Parquet's ``image`` column, so both formats
give identical pixels. The output folder layout is documented in samples.py.

The whole output folder is written atomically. If validation fails (too many rejected
rows, exit 3) the output folder is replaced by one holding only the validation report:
no split files and no dataset_info.json, so no later step can mistake stale data for
the result of this input. Identical input and config give byte-identical files.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from riskva_core import atomic
from riskva_core.data.conversation import PromptTemplate, to_plain
from riskva_core.errors import RiskvaError
from riskva_core.data.images import DEFAULT_MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, EncodeSpec
from riskva_core.data.samples import FORMATS, SCHEMA_VERSION, SPLITS
from riskva_core.schema import FIELD_LEVEL, FIELDS, LEVELS
from riskva_core.data import validated as validated_store
from riskva_core.data.groups import DEFAULT_RADIUS, MAX_RADIUS, load_history, plan_splits
from riskva_core.data.validate import (EXIT_TOO_MANY_REJECTS, ValidRecord, add_validation_args, failure_message, summary_lines,
                                      validate, write_reports)

IMAGES_DIR = "images"
SPLIT_JSON = "split.json"
DATASET_INFO = "dataset_info.json"
PARQUET_META_PREFIX = "riskva."


@dataclasses.dataclass
class PrepareConfig:
    csv_path: str
    image_base_path: str
    output_path: str
    format: str = "parquet"
    image_quality: int = 85
    max_image_size: tuple[int, int] = (1024, 1024)
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 42
    max_reject_ratio: float = 0.1
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    prompt_config: str | None = None
    num_workers: int | None = None
    row_group_size: int = 128
    near_duplicate_radius: int = DEFAULT_RADIUS
    group_column: str | None = None
    previous_split: tuple[str, ...] = ()
    # A validation folder (data/validated.py) to reuse instead of decoding again (Dagster's raw_metadata).
    validated_dir: str | None = None

    def __post_init__(self) -> None:
        self.csv_path, self.image_base_path, self.output_path = map(str, (self.csv_path, self.image_base_path, self.output_path))
        if self.prompt_config is not None:
            self.prompt_config = str(self.prompt_config)
        self.max_image_size = tuple(int(v) for v in self.max_image_size)  # type: ignore[assignment]
        if self.format not in FORMATS:
            raise RiskvaError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.image_quality <= 100:
            raise RiskvaError(f"--image_quality must be within 1..100, got {self.image_quality}")
        if len(self.max_image_size) != 2 or min(self.max_image_size) < MIN_IMAGE_SIDE:
            raise RiskvaError(f"--max_image_size needs two sizes >= {MIN_IMAGE_SIDE}, got {list(self.max_image_size)}")
        for flag in ("val_ratio", "test_ratio"):
            value = getattr(self, flag)
            if not 0.0 <= value < 1.0:
                raise RiskvaError(f"--{flag} must be within [0, 1), got {value}")
        if self.val_ratio + self.test_ratio >= 1.0:
            raise RiskvaError(f"--val_ratio + --test_ratio must be below 1, got {self.val_ratio + self.test_ratio:g}")
        if not 0.0 <= self.max_reject_ratio <= 1.0:
            raise RiskvaError(f"--max_reject_ratio must be within [0, 1], got {self.max_reject_ratio}")
        if self.num_workers is not None and self.num_workers < 1:
            raise RiskvaError(f"--num_workers must be at least 1, got {self.num_workers}")
        if self.row_group_size < 1:
            raise RiskvaError(f"--row_group_size must be at least 1, got {self.row_group_size}")
        if not 0 <= self.near_duplicate_radius <= MAX_RADIUS:
            raise RiskvaError(f"--near_duplicate_radius must be within 0..{MAX_RADIUS} bits, got {self.near_duplicate_radius}")
        self.previous_split = tuple(str(p) for p in self.previous_split)

    def recorded(self) -> dict[str, Any]:
        """The settings that determine the output (not where it goes, not how many workers)."""
        d = dataclasses.asdict(self)
        for key in ("output_path", "num_workers", "validated_dir"):
            d.pop(key)
        d["previous_split"] = list(self.previous_split)
        d["csv_path"] = str(Path(self.csv_path).resolve())
        d["image_base_path"] = str(Path(self.image_base_path).resolve())
        d["max_image_size"] = list(self.max_image_size)
        return d


def sample_id(image_sha256: str, image_path: str, fields: dict[str, str]) -> str:
    """Stable id: the source image content plus its labels (image_path keeps ids unique)."""
    payload = json.dumps([image_sha256, image_path, [fields[f] for f in FIELDS]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rows(records: list[ValidRecord], template: PromptTemplate) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        row: dict[str, Any] = {
            "id": sample_id(rec.image_sha256, rec.image_path, rec.fields),
            "image_id": rec.image_id,
            "image_path": rec.image_path,
            "image": rec.image.encoded_name,
            # No image path inside messages: the reader attaches pixels, and JSONL and
            # Parquet samples stay identical. Plain strings so other trainers read it as is.
            "messages": to_plain(template.messages(None, rec.fields)),
        }
        row.update(rec.fields)
        row["extra"] = dict(sorted(rec.extra.items()))
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]], final_dir: Path) -> None:
    """``final_dir`` is where the folder will live after the atomic rename: ms-swift resolves
    image paths from its working folder, so the ``images`` column must be absolute."""
    lines = []
    for row in rows:
        rel = f"{IMAGES_DIR}/{row['image']}"
        line = dict(row, image=rel, images=[str(final_dir / rel)])
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    atomic.write_text(path, "".join(lines))


def _arrow_schema(metadata: dict[str, str]):
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("messages", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))),
        *[pa.field(f, pa.string()) for f in FIELDS],
        pa.field("extra", pa.string()),
    ]
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in metadata.items()})


def _hf_features() -> str:
    """Lets Hugging Face ``datasets`` load the files with the image column typed as Image."""
    value = {"dtype": "string", "_type": "Value"}
    message = {"role": value, "content": value}
    features = {"id": value, "image_id": value, "image_path": value, "image": {"_type": "Image"},
                "messages": {"_type": "List", "feature": message}}
    features.update({f: value for f in FIELDS})
    features["extra"] = value
    return json.dumps({"info": {"features": features}}, ensure_ascii=False, sort_keys=True)


def _llamafactory_entry(split: str, fmt: str) -> dict[str, Any]:
    return {
        "file_name": f"{split}.{fmt}",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images" if fmt == "jsonl" else "image"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"},
    }


def _batches(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _write_parquet(path: Path, rows: list[dict[str, Any]], staging: Path, metadata: dict[str, str], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(metadata)
    small = ["id", "image_id", "image_path", FIELD_LEVEL]
    with atomic.atomic_path(path) as tmp:
        # Streamed one row group at a time: memory stays bounded by the row-group size.
        with pq.ParquetWriter(
            tmp,
            schema,
            compression="zstd",
            use_dictionary=small,
            write_statistics=small,
        ) as writer:
            if not rows:
                writer.write_table(schema.empty_table())
            for batch in _batches(rows, row_group_size):
                table = pa.Table.from_pylist(
                    [
                        dict(
                            row,
                            image={"bytes": (staging / row["image"]).read_bytes(), "path": row["image"]},
                            extra=json.dumps(row["extra"], ensure_ascii=False, sort_keys=True),
                        )
                        for row in batch
                    ],
                    schema=schema,
                )
                writer.write_table(table, row_group_size=row_group_size)


def _grouped_by(cfg: PrepareConfig) -> str:
    return ("image content sha256 + pHash family (full frame, central crops) within "
            f"{cfg.near_duplicate_radius} bits" + (f" + CSV column {cfg.group_column}" if cfg.group_column else ""))


def _level_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {lvl: sum(1 for r in rows if r[FIELD_LEVEL] == lvl) for lvl in LEVELS}


def _plan(cfg: PrepareConfig, records: list[ValidRecord], report: dict[str, Any]):
    if cfg.group_column is not None and cfg.group_column not in report["extra_columns"]:
        raise RiskvaError(f"--group_column {cfg.group_column}: no such column in the CSV "
                          f"(extra columns: {', '.join(report['extra_columns']) or 'none'})")
    return plan_splits(
        [r.image_sha256 for r in records], [r.image.phash for r in records], cfg.val_ratio, cfg.test_ratio, cfg.seed,
        radius=cfg.near_duplicate_radius,
        group_keys=[r.extra.get(cfg.group_column) for r in records] if cfg.group_column else None,
        history=load_history(cfg.previous_split) if cfg.previous_split else None,
        names=[r.image_path for r in records],
    )


def _write_dataset(cfg: PrepareConfig, tmp: Path, staging: Path, records: list[ValidRecord], report: dict[str, Any],
                   template: PromptTemplate, image_dir: Path | None = None) -> dict[str, Any]:
    """``image_dir``: where the encoded JPEGs are (default ``staging``: this run's own encoding)."""
    image_dir = image_dir or staging
    plan = _plan(cfg, records, report)
    kept = [i for i, s in enumerate(plan.splits) if s is not None]
    excluded = [{"row": records[i].row, "image_path": records[i].image_path, "reason": reason}
                for i, reason in sorted(plan.excluded.items())]
    records = [records[i] for i in kept]
    splits = [plan.splits[i] for i in kept]
    groups = [plan.groups[i] for i in kept]
    rows = _rows(records, template)
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for row, split in zip(rows, splits):
        by_split[split].append(row)
    if cfg.format == "jsonl" and image_dir != staging:
        for row in rows:
            if not (staging / row["image"]).exists():
                shutil.copyfile(image_dir / row["image"], staging / row["image"])

    metadata = {
        f"{PARQUET_META_PREFIX}schema_version": str(SCHEMA_VERSION),
        f"{PARQUET_META_PREFIX}source_csv_sha256": report["csv_sha256"],
        f"{PARQUET_META_PREFIX}prepare_config": json.dumps(cfg.recorded(), ensure_ascii=False, sort_keys=True),
        f"{PARQUET_META_PREFIX}prompt_template": json.dumps(template.to_dict(), ensure_ascii=False, sort_keys=True),
        "huggingface": _hf_features(),
    }
    files: dict[str, str] = {}
    for split in SPLITS:
        name = f"{split}.{cfg.format}"
        if cfg.format == "jsonl":
            _write_jsonl(tmp / name, by_split[split], Path(cfg.output_path).resolve())
        else:
            _write_parquet(tmp / name, by_split[split], image_dir, metadata, cfg.row_group_size)
        files[name] = _sha256_file(tmp / name)

    if cfg.format == "jsonl":
        used = {r["image"] for r in rows}
        for f in staging.iterdir():  # images of rows rejected after decoding
            if f.name not in used:
                f.unlink()
    else:
        shutil.rmtree(staging)

    atomic.write_json(
        tmp / SPLIT_JSON,
        {
            "seed": cfg.seed,
            "val_ratio": cfg.val_ratio,
            "test_ratio": cfg.test_ratio,
            "stratified_by": FIELD_LEVEL,
            "grouped_by": _grouped_by(cfg),
            "near_duplicate_radius": cfg.near_duplicate_radius,
            "rows": [
                {"row": rec.row, "image_id": rec.image_id, "image_path": rec.image_path, "id": row["id"], "split": split,
                 "image_sha256": rec.image_sha256, "phash": rec.image.phash, "group": group}
                for rec, row, split, group in zip(records, rows, splits, groups)
            ],
            "excluded": excluded,
            "warnings": plan.warnings,  # oversized groups, ratio drift (groups.py)
            "rejected_rows": [r["row"] for r in report["rejected"]],
        },
    )
    fingerprint = hashlib.sha256("".join(f"{n}\t{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    info = {
        "format": cfg.format,
        "schema_version": SCHEMA_VERSION,
        "splits": {
            s: {"file": f"{s}.{cfg.format}", "rows": len(by_split[s]), "levels": _level_counts(by_split[s]), "sha256": files[f"{s}.{cfg.format}"]}
            for s in SPLITS
        },
        "counts": {s: len(by_split[s]) for s in SPLITS},
        "groups": plan.group_counts(),
        "near_duplicates": {"radius": cfg.near_duplicate_radius, "grouped_by": _grouped_by(cfg),
                            "multi_photo_groups": plan.multi_photo_groups(), "excluded_rows": len(excluded),
                            "warnings": plan.warnings},
        "rows_total": report["rows_total"],
        "rows_valid": report["rows_valid"],
        "rows_rejected": report["rows_rejected"],
        "source_csv": report["csv_path"],
        "source_csv_sha256": report["csv_sha256"],
        "fingerprint": fingerprint,
        "image": {"format": "JPEG", "quality": cfg.image_quality, "max_size": list(cfg.max_image_size)},
        "prepare_config": cfg.recorded(),
        "prompt_template": template.to_dict(),
        "seed": cfg.seed,
        # LLaMA-Factory looks datasets up by name in <dataset_dir>/dataset_info.json; these
        # entries let it train on this folder as it is (see README, "Other trainers").
        **{f"riskva_{s}": _llamafactory_entry(s, cfg.format) for s in SPLITS},
    }
    atomic.write_json(tmp / DATASET_INFO, info)
    return info


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Validate, split and write the dataset; returns dataset_info. Exit 3 (RiskvaError) on too many rejects."""
    template = PromptTemplate.load(cfg.prompt_config)
    out = Path(cfg.output_path)
    info: dict[str, Any] | None = None
    with atomic.atomic_dir(out) as tmp:
        staging = tmp / (IMAGES_DIR if cfg.format == "jsonl" else ".staging")
        staging.mkdir()
        spec = EncodeSpec(cfg.max_image_size, cfg.image_quality, str(staging))
        result = None if cfg.validated_dir is None else validated_store.load(
            cfg.validated_dir, cfg.csv_path, cfg.image_base_path, cfg.max_image_pixels, spec)
        image_dir = None
        if result is not None:  # validated once for this data version: nothing is decoded again
            image_dir = validated_store.encoded_dir(cfg.validated_dir)
            result.report["max_reject_ratio"] = cfg.max_reject_ratio
            result.passed = bool(result.records) and result.report["reject_ratio"] <= cfg.max_reject_ratio
            result.report["passed"] = result.passed
            write_reports(result.report, tmp)
            print(f"reusing the validation in {cfg.validated_dir} (same CSV, images and settings): no image decoded")
        else:
            result = validate(
                cfg.csv_path,
                cfg.image_base_path,
                output_dir=tmp,
                max_reject_ratio=cfg.max_reject_ratio,
                max_image_pixels=cfg.max_image_pixels,
                num_workers=cfg.num_workers,
                encode=spec,
            )
        if result.passed:
            info = _write_dataset(cfg, tmp, staging, result.records, result.report, template, image_dir)
        else:
            shutil.rmtree(staging)
    print("\n".join(summary_lines(result.report)))
    if info is None:
        raise RiskvaError(failure_message(result.report, out), EXIT_TOO_MANY_REJECTS)
    return info


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="riskva prepare",
        description="Validate a raw CSV, split it and write a self-contained JSONL or Parquet SFT dataset.",
    )
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="jsonl (images as files) or parquet (images embedded; default)")
    add_validation_args(parser, csv_required=False)
    parser.add_argument("--output_path", help="output folder (replaced atomically)")
    parser.add_argument("--image_quality", type=int, default=85, help="JPEG quality 1..100 of the stored images (default 85)")
    parser.add_argument("--max_image_size", type=int, nargs=2, default=[1024, 1024], metavar=("W", "H"), help="fit images within W x H, keeping aspect, never upscaling (default 1024 1024)")
    parser.add_argument("--val_ratio", type=float, default=0.1, help="fraction of images for validation (default 0.1)")
    parser.add_argument("--test_ratio", type=float, default=0.1, help="fraction of images for test (default 0.1)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    parser.add_argument("--prompt_config", default=None, help="JSON with system_prompt / instruction / answer_template (default: built-in)")
    parser.add_argument("--row_group_size", type=int, default=128, help="Parquet rows per row group (default 128)")
    parser.add_argument("--near_duplicate_radius", type=int, default=DEFAULT_RADIUS,
                        help=f"photos whose perceptual hashes differ in at most this many of 64 bits are one group, "
                        f"kept in one split (default {DEFAULT_RADIUS}; 0: identical pHash only)")
    parser.add_argument("--group_column", default=None,
                        help="CSV column whose equal non-empty values form one group too (e.g. a site or inspection id)")
    parser.add_argument("--previous_split", action="append", default=[], metavar="PREPARED",
                        help="an earlier version's prepared folder (or its split.json): its photos keep their split; "
                        "repeatable, oldest first")
    parser.add_argument(
        "--preview",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="with FILE: only preview that prepared file/folder (the seed's spelling); alone: preview the output after preparing",
    )
    args = parser.parse_args(argv)
    from riskva_core.data import preview as preview_mod

    if args.preview:
        return preview_mod.main([args.preview])
    missing = [f"--{k}" for k in ("csv_path", "image_base_path", "output_path") if not getattr(args, k)]
    if missing:
        raise RiskvaError(f"missing required flag(s) {', '.join(missing)}")
    cfg = PrepareConfig(
        csv_path=args.csv_path,
        image_base_path=args.image_base_path,
        output_path=args.output_path,
        format=args.format,
        image_quality=args.image_quality,
        max_image_size=tuple(args.max_image_size),
        val_ratio=args.val_ratio,
        test_ratio=args.test_ratio,
        seed=args.seed,
        max_reject_ratio=args.max_reject_ratio,
        max_image_pixels=args.max_image_pixels,
        prompt_config=args.prompt_config,
        num_workers=args.num_workers,
        row_group_size=args.row_group_size,
        near_duplicate_radius=args.near_duplicate_radius,
        group_column=args.group_column,
        previous_split=tuple(args.previous_split),
    )
    info = prepare(cfg)
    print(f"wrote {cfg.format} dataset to {cfg.output_path}: " + ", ".join(
        f"{s} {n} ({info['groups'][s]} groups)" for s, n in info["counts"].items()))
    if info["near_duplicates"]["excluded_rows"]:
        print(f"{info['near_duplicates']['excluded_rows']} photos kept out of every split (near-duplicates of photos "
              f"already in different splits); see {Path(cfg.output_path) / SPLIT_JSON}")
    for warning in info["near_duplicates"]["warnings"]:
        print(f"warning: {warning}")
    if args.preview is not None:
        print(preview_mod.preview(cfg.output_path))
    return 0
