"""Data assets: the validated raw CSV and the prepared SFT datasets (JSONL, Parquet)."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import json
import os
from collections import Counter
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELD_LEVEL, FIELDS, LEVELS

from . import lineage
from .asset_metadata import CODE_VERSIONS, DATA, PREVIEW_ROWS, md_cell, md_table
from .partitions import DATASET_VERSION, dataset_version
from .resources import DataRootResource


class RawMetadataConfig(dg.Config):
    max_reject_ratio: float = Field(default=0.1, description="schema_valid fails above this rejected-row fraction")


# Validation encodes with the prepared assets' default image settings, so sft_jsonl/sft_parquet reuse its
# records, hashes and JPEGs (riskva_core/data/validated.py) and decode nothing; other settings re-validate.
DEFAULT_IMAGE_QUALITY = 85
DEFAULT_MAX_IMAGE_SIDE = 1024


RAW_COLUMN_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("image_id", "string", description="optional; synthesised when missing"),
        dg.TableColumn("image_path", "string", description="relative to the dataset folder"),
        *[dg.TableColumn(f"data_{f}", "string", description=f"report field {f}") for f in FIELDS],
    ]
)


@dg.asset(
    partitions_def=dataset_version,
    group_name=DATA,
    kinds={"pandas", "csv"},
    code_version=CODE_VERSIONS["raw_metadata"],
    check_specs=[
        dg.AssetCheckSpec(
            "schema_valid",
            asset="raw_metadata",
            blocking=True,
            description="pandera schema + image checks; fails (and blocks everything downstream) "
            "when the rejected fraction exceeds max_reject_ratio",
        )
    ],
    description="The raw CSV of a dataset version, validated with pandera (riskva_core.data.validate): "
    "columns, levels, image paths and decodability. Rejected rows are listed in the metadata.",
)
def raw_metadata(
    context: dg.AssetExecutionContext, config: RawMetadataConfig, paths: DataRootResource
) -> dg.MaterializeResult:
    from riskva_core.data import validated
    from riskva_core.data.images import DEFAULT_MAX_IMAGE_PIXELS, EncodeSpec
    from riskva_core.data.validate import validate

    root = paths.layout()
    version = context.partition_key
    csv = root.dataset_csv(version)
    out_dir = root.validation_dir(version)
    encoded = validated.encoded_dir(out_dir)
    encoded.mkdir(parents=True, exist_ok=True)
    spec = EncodeSpec((DEFAULT_MAX_IMAGE_SIDE,) * 2, DEFAULT_IMAGE_QUALITY, str(encoded))
    try:
        result = validate(csv, root.dataset_dir(version), output_dir=out_dir, max_reject_ratio=config.max_reject_ratio,
                          encode=spec)
    except RiskvaError as exc:
        # Unusable input (no file, missing columns): record why on the check; nothing downstream runs.
        return dg.MaterializeResult(
            metadata={"error": str(exc), "csv": dg.MetadataValue.path(str(csv))},
            data_version=dg.DataVersion(lineage.text_hash("error", str(exc))[:16]),
            check_results=[
                dg.AssetCheckResult(check_name="schema_valid", passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                    metadata={"error": str(exc)})
            ],
        )
    validated.save(result, out_dir, DEFAULT_MAX_IMAGE_PIXELS, spec)
    report = result.report
    levels = Counter(r.fields[FIELD_LEVEL] for r in result.records)
    rejected_rows = [[r["row"], r["image_path"], "; ".join(r["reasons"])] for r in report["rejected"][:50]]
    rejected_md = (
        md_table(["row", "image_path", "reasons"], rejected_rows)
        + (f"\n\n… and {len(report['rejected']) - 50} more" if len(report["rejected"]) > 50 else "")
        if rejected_rows
        else "No rejected rows."
    )
    content = lineage.text_hash(report["csv_sha256"], *sorted(r.image_sha256 for r in result.records))
    check = dg.AssetCheckResult(
        check_name="schema_valid",
        passed=result.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{report['rows_rejected']}/{report['rows_total']} rows rejected "
        f"(limit {config.max_reject_ratio:.0%})",
        metadata={
            "reject_ratio": float(report["reject_ratio"]),
            "max_reject_ratio": float(config.max_reject_ratio),
            "rows_rejected": int(report["rows_rejected"]),
            "rejected_rows": dg.MetadataValue.md(rejected_md),
        },
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": int(report["rows_total"]),
            "dagster/column_schema": RAW_COLUMN_SCHEMA,
            "rows_valid": int(report["rows_valid"]),
            "rows_rejected": int(report["rows_rejected"]),
            "reject_ratio": float(report["reject_ratio"]),
            "level_distribution": dg.MetadataValue.md(
                md_table(["风险等级", "rows"], [[lvl, levels.get(lvl, 0)] for lvl in LEVELS])
            ),
            "rejected_rows": dg.MetadataValue.md(rejected_md),
            "csv": dg.MetadataValue.path(str(csv)),
            "csv_sha256": report["csv_sha256"],
            "validation_report": dg.MetadataValue.path(str(out_dir / "validation_report.md")),
        },
        data_version=dg.DataVersion(content[:16]),
        check_results=[check],
    )


class PrepareAssetConfig(dg.Config):
    val_ratio: float = Field(default=0.1, description="share of rows in the validation split")
    test_ratio: float = Field(default=0.1, description="share of rows in the test split")
    seed: int = Field(default=42, description="split seed")
    image_quality: int = Field(default=85, description="JPEG quality of the normalised images")
    max_image_side: int = Field(default=1024, description="images are fit within this square, never upscaled")
    max_reject_ratio: float = Field(default=0.1, description="same limit as raw_metadata's schema_valid")
    # = riskva_core.data.groups.DEFAULT_RADIUS (tests/data/test_groups.py checks), not imported: groups
    # loads imagehash, which every load of the definitions would pay for.
    near_duplicate_radius: int = Field(default=8, description="photos with any two perceptual hashes "
                                       "(full frame, central crops) within this many of 64 bits are one group, kept "
                                       "in one split (0: identical only)")
    group_column: Optional[str] = Field(default=None, description="CSV column whose equal values form one group too "
                                        "(e.g. a site or inspection id)")
    prompt_config: Optional[str] = Field(
        default=None,
        description="prompt/answer template JSON (riskva prepare --prompt_config); default: $RISKVA_PROMPT_CONFIG, "
        "else the seed's answer format",
    )


def _prepare(context: dg.AssetExecutionContext, config: PrepareAssetConfig, paths: DataRootResource,
             fmt: str) -> dg.MaterializeResult:
    from riskva_core.data.prepare import PrepareConfig, prepare
    from riskva_core.data.samples import read_samples

    from riskva_core.data.groups import split_leaks

    root = paths.layout()
    version = context.partition_key
    out = root.prepared_dir(version, fmt)
    # Earlier versions (in the order they were added) keep their photos' splits: no photo ever moves.
    versions = context.instance.get_dynamic_partitions(DATASET_VERSION)
    earlier = versions[:versions.index(version)] if version in versions else []
    history = [str(root.prepared_dir(v, fmt)) for v in earlier if (root.prepared_dir(v, fmt) / "split.json").is_file()]
    info = prepare(PrepareConfig(
        csv_path=str(root.dataset_csv(version)), image_base_path=str(root.dataset_dir(version)),
        output_path=str(out), format=fmt, image_quality=config.image_quality,
        max_image_size=(config.max_image_side, config.max_image_side), val_ratio=config.val_ratio,
        test_ratio=config.test_ratio, seed=config.seed, max_reject_ratio=config.max_reject_ratio,
        prompt_config=config.prompt_config or os.environ.get("RISKVA_PROMPT_CONFIG") or None,
        near_duplicate_radius=config.near_duplicate_radius, group_column=config.group_column,
        previous_split=tuple(history), validated_dir=str(root.validation_dir(version)),
    ))
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    leaks = split_leaks(split["rows"], config.near_duplicate_radius)
    check = dg.AssetCheckResult(
        check_name="no_near_duplicate_leak", passed=not leaks, severity=dg.AssetCheckSeverity.ERROR,
        description=(f"{len(leaks)}{'+' if len(leaks) >= 20 else ''} val/test photos lie within "
                     f"{config.near_duplicate_radius} pHash bits of a train photo") if leaks
        else f"no val/test photo within {config.near_duplicate_radius} pHash bits of a train photo",
        metadata={"radius": config.near_duplicate_radius, "leaks": dg.MetadataValue.json(leaks)},
    )
    preview = read_samples(out, "train")[:PREVIEW_ROWS]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "format": fmt,
            "split_sizes": dg.MetadataValue.json(dict(info["counts"])),
            # Splits follow each image's seeded hash (stable across versions), so stratification is
            # approximate: show what each split got per level.
            "split_levels": dg.MetadataValue.md(md_table(
                ["split", *LEVELS], [[s, *[info["splits"][s]["levels"].get(lvl, 0) for lvl in LEVELS]]
                                     for s in info["counts"]])),
            "split_groups": dg.MetadataValue.json(dict(info["groups"])),
            "excluded_near_duplicates": dg.MetadataValue.json(split["excluded"][:50]),
            # oversized near-duplicate groups, split shares off the requested ratios (groups.py)
            "split_warnings": dg.MetadataValue.json(split.get("warnings", [])),
            "history_versions": dg.MetadataValue.json([v for v in earlier if str(root.prepared_dir(v, fmt)) in history]),
            "dagster/row_count": int(sum(info["counts"].values())),
            "bytes": lineage.folder_bytes(out),
            "fingerprint": info["fingerprint"],
            "preview": dg.MetadataValue.table(
                records=[
                    dg.TableRecord({"id": s.id[:12], "image_path": s.image_path,
                                    **{f: md_cell(s.fields.get(f, ""), 40) for f in FIELDS}})
                    for s in preview
                ],
                schema=dg.TableSchema(columns=[dg.TableColumn("id"), dg.TableColumn("image_path")]
                                      + [dg.TableColumn(f) for f in FIELDS]),
            ),
        },
        data_version=dg.DataVersion(info["fingerprint"][:16]),
        check_results=[check],
    )


# No automation condition: the datasets sensor launches data_job (raw_metadata + both prepared
# formats) for every new or changed folder, which is the one trigger; an eager condition would
# need the automation-condition sensor running too and would only duplicate those runs.
_prepare_kwargs: dict[str, Any] = dict(
    partitions_def=dataset_version,
    group_name=DATA,
    code_version=CODE_VERSIONS["sft_jsonl"],
    deps=["raw_metadata"],
)


def _leak_check(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(
        "no_near_duplicate_leak", asset=asset, blocking=True,
        description="fails when a val/test photo lies within the near-duplicate radius (pHash bits) of a train "
        "photo: its test score would partly measure memory")]


@dg.asset(kinds={"json"}, description="Prepared SFT dataset as JSONL + normalised JPEGs "
          "(riskva_core.data.prepare; layout in riskva_core/data/samples.py).",
          check_specs=_leak_check("sft_jsonl"), **_prepare_kwargs)
def sft_jsonl(context: dg.AssetExecutionContext, config: PrepareAssetConfig,
              paths: DataRootResource) -> dg.MaterializeResult:
    return _prepare(context, config, paths, "jsonl")


@dg.asset(kinds={"parquet"}, description="The same SFT samples as Parquet with image bytes in-column "
          "(Hugging Face datasets Image layout).", check_specs=_leak_check("sft_parquet"), **_prepare_kwargs)
def sft_parquet(context: dg.AssetExecutionContext, config: PrepareAssetConfig,
                paths: DataRootResource) -> dg.MaterializeResult:
    return _prepare(context, config, paths, "parquet")
