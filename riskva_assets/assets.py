"""The RisKVA asset graph: one chain per dataset version (partition).

    raw_metadata ─┬─ sft_jsonl ─┬─ base_model ─ lora_adapter ─ merged_model ─ registered_model
                  └─ sft_parquet┘                                               │
                                                evaluation_report ──────────────┘
                                                        │
                                                champion_promotion

Every asset is a thin wrapper over riskva_core: it computes its partition's paths
(riskva_core/paths.py), calls one core function, and returns a MaterializeResult
with metadata and a DataVersion from a content hash. Nothing is passed through an
IO manager: each asset reads its upstream's files at their partition-keyed paths.
"""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from riskva_core import registry as reg
from riskva_core.errors import RiskvaError
from riskva_core.recipes import DEMO_CPU_MODEL_SIZE
from riskva_core.schema import CSV_COLUMNS, FIELD_DESC, FIELD_LEVEL, FIELDS, LEVELS

from . import lineage
from .partitions import dataset_version
from .resources import DataRootResource, MlflowResource, TrainingLauncher

CODE_VERSION = "1"
DATA = "data"
MODEL = "model"
REGISTRY = "registry"
PREVIEW_ROWS = 5


def _md_cell(value: Any, limit: int = 60) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _upstream_metadata(context: dg.AssetExecutionContext, key: str) -> dict[str, Any]:
    """Metadata values of an upstream asset's latest materialization of this partition."""
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[context.partition_key]), limit=1
    )
    if not result.records or result.records[0].asset_materialization is None:
        raise RiskvaError(f"{key} has no materialization for partition {context.partition_key!r}; materialize it first")
    return {k: getattr(v, "value", v) for k, v in result.records[0].asset_materialization.metadata.items()}


# ----------------------------------------------------------------------------- data
class RawMetadataConfig(dg.Config):
    max_reject_ratio: float = Field(default=0.1, description="schema_valid fails above this rejected-row fraction")


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
    code_version=CODE_VERSION,
    check_specs=[
        dg.AssetCheckSpec(
            "schema_valid",
            asset="raw_metadata",
            blocking=True,
            description="pandera schema + image checks; fails (and blocks everything downstream) "
            "when the rejected fraction exceeds max_reject_ratio",
        )
    ],
    description="The raw CSV of a dataset version, validated with pandera (riskva_core.validate): "
    "columns, levels, image paths and decodability. Rejected rows are listed in the metadata.",
)
def raw_metadata(
    context: dg.AssetExecutionContext, config: RawMetadataConfig, paths: DataRootResource
) -> dg.MaterializeResult:
    from riskva_core.validate import validate

    root = paths.layout()
    version = context.partition_key
    csv = root.dataset_csv(version)
    out_dir = root.validation_dir(version)
    try:
        result = validate(csv, root.dataset_dir(version), output_dir=out_dir, max_reject_ratio=config.max_reject_ratio)
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
    report = result.report
    levels = Counter(r.fields[FIELD_LEVEL] for r in result.records)
    rejected_rows = [[r["row"], r["image_path"], "; ".join(r["reasons"])] for r in report["rejected"][:50]]
    rejected_md = (
        _md_table(["row", "image_path", "reasons"], rejected_rows)
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
                _md_table(["风险等级", "rows"], [[lvl, levels.get(lvl, 0)] for lvl in LEVELS])
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
    prompt_config: Optional[str] = Field(
        default=None,
        description="prompt/answer template JSON (riskva prepare --prompt_config); default: $RISKVA_PROMPT_CONFIG, "
        "else the seed's answer format",
    )


def _prepare(context: dg.AssetExecutionContext, config: PrepareAssetConfig, paths: DataRootResource,
             fmt: str) -> dg.MaterializeResult:
    from riskva_core.prepare import PrepareConfig, prepare
    from riskva_core.samples import read_samples

    root = paths.layout()
    version = context.partition_key
    out = root.prepared_dir(version, fmt)
    info = prepare(PrepareConfig(
        csv_path=str(root.dataset_csv(version)), image_base_path=str(root.dataset_dir(version)),
        output_path=str(out), format=fmt, image_quality=config.image_quality,
        max_image_size=(config.max_image_side, config.max_image_side), val_ratio=config.val_ratio,
        test_ratio=config.test_ratio, seed=config.seed, max_reject_ratio=config.max_reject_ratio,
        prompt_config=config.prompt_config or os.environ.get("RISKVA_PROMPT_CONFIG") or None,
    ))
    preview = read_samples(out, "train")[:PREVIEW_ROWS]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "format": fmt,
            "split_sizes": dg.MetadataValue.json(dict(info["counts"])),
            "dagster/row_count": int(sum(info["counts"].values())),
            "bytes": lineage.folder_bytes(out),
            "fingerprint": info["fingerprint"],
            "preview": dg.MetadataValue.table(
                records=[
                    dg.TableRecord({"id": s.id[:12], "image_path": s.image_path,
                                    **{f: _md_cell(s.fields.get(f, ""), 40) for f in FIELDS}})
                    for s in preview
                ],
                schema=dg.TableSchema(columns=[dg.TableColumn("id"), dg.TableColumn("image_path")]
                                      + [dg.TableColumn(f) for f in FIELDS]),
            ),
        },
        data_version=dg.DataVersion(info["fingerprint"][:16]),
    )


_prepare_kwargs: dict[str, Any] = dict(
    partitions_def=dataset_version,
    group_name=DATA,
    code_version=CODE_VERSION,
    deps=["raw_metadata"],
    # Cheap and deterministic: refresh whenever the validated CSV changes.
    automation_condition=dg.AutomationCondition.eager(),
)


@dg.asset(kinds={"json"}, description="Prepared SFT dataset as JSONL + normalised JPEGs "
          "(riskva_core.prepare; layout in riskva_core/samples.py).", **_prepare_kwargs)
def sft_jsonl(context: dg.AssetExecutionContext, config: PrepareAssetConfig,
              paths: DataRootResource) -> dg.MaterializeResult:
    return _prepare(context, config, paths, "jsonl")


@dg.asset(kinds={"parquet"}, description="The same SFT samples as Parquet with image bytes in-column "
          "(Hugging Face datasets Image layout).", **_prepare_kwargs)
def sft_parquet(context: dg.AssetExecutionContext, config: PrepareAssetConfig,
                paths: DataRootResource) -> dg.MaterializeResult:
    return _prepare(context, config, paths, "parquet")


# ----------------------------------------------------------------------------- model
class BaseModelConfig(dg.Config):
    size: str = Field(default=DEMO_CPU_MODEL_SIZE, description="demo model size when no base_model_path: tiny | small")
    seed: int = Field(default=0, description="weight-initialisation seed of the demo model")


@dg.asset(
    partitions_def=dataset_version,
    group_name=MODEL,
    kinds={"pytorch", "huggingface"},
    code_version=CODE_VERSION,
    deps=["sft_jsonl"],
    description="The base model to fine-tune. With TrainingLauncher.base_model_path set (a local folder or a "
    "hub id such as Qwen/Qwen2.5-VL-7B-Instruct) it is recorded as is; otherwise the demo model is built: "
    "a small random-weight Qwen2.5-VL whose tokenizer is trained on this version's prepared text.",
)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, paths: DataRootResource,
               launcher: TrainingLauncher) -> dg.MaterializeResult:
    root = paths.layout()
    version = context.partition_key
    if launcher.base_model_path:
        local = Path(launcher.base_model_path).expanduser()
        if local.is_dir():
            digest = lineage.folder_hash(local, ("*.json", "*.txt", "*.jinja", "*.index.json"))
            source = str(local.resolve())
        else:  # a hub id: its revision is fixed by the hub cache, the name is the identity here
            digest = lineage.text_hash(launcher.base_model_path)
            source = launcher.base_model_path
        return dg.MaterializeResult(
            metadata={"base_model": source, "built": False, "config_hash": digest},
            data_version=dg.DataVersion(digest[:16]),
        )
    from riskva_core.tiny_model import TinyModelConfig, build_tiny_model

    out = build_tiny_model(TinyModelConfig(output_dir=root.base_model_dir(version),
                                           dataset_path=root.prepared_dir(version, "jsonl"),
                                           size=config.size, seed=config.seed))
    info = _json_or_none(out / "tiny_model_info.json") or {}
    digest = lineage.folder_hash(out)
    return dg.MaterializeResult(
        metadata={
            "base_model": dg.MetadataValue.path(str(out)),
            "built": True,
            "size": config.size,
            "parameters": int(info.get("parameters", 0)),
            "bytes": lineage.folder_bytes(out),
        },
        data_version=dg.DataVersion(digest[:16]),
    )


def base_model_location(paths: DataRootResource, launcher: TrainingLauncher, version: str) -> str:
    return launcher.base_model_path or str(paths.layout().base_model_dir(version))


class TrainConfig(dg.Config):
    """Training hyperparameters, editable in the Launchpad. Unset fields take the recipe's value."""

    recipe: str = Field(default="auto", description="auto (seed recipe with a GPU, demo recipe on CPU) | demo | seed")
    max_steps: Optional[int] = Field(default=None, description="optimizer steps (overrides epochs)")
    num_train_epochs: Optional[float] = Field(default=None, description="epochs")
    learning_rate: Optional[float] = Field(default=None, description="peak learning rate")
    per_device_train_batch_size: Optional[int] = Field(default=None, description="batch size per rank")
    gradient_accumulation_steps: Optional[int] = Field(default=None, description="accumulation steps")
    lora_r: Optional[int] = Field(default=None, description="LoRA rank")
    lora_alpha: Optional[int] = Field(default=None, description="LoRA alpha")
    seed: Optional[int] = Field(default=None, description="training seed")
    extra_args: list[str] = Field(default_factory=list, description="more riskva_core.train flags, verbatim")

    def train_args(self) -> tuple[str, list[str]]:
        """(recipe used, flags): the recipe's flags, then every field set here (last flag wins)."""
        from riskva_core.recipes import resolve

        recipe, args = resolve(self.recipe)
        for name in ("max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "lora_r", "lora_alpha", "seed"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--{name}", str(value)]
        return recipe, args + list(self.extra_args)


@dg.asset(
    partitions_def=dataset_version,
    group_name=MODEL,
    kinds={"pytorch", "deepspeed"},
    code_version=CODE_VERSION,
    deps=["base_model", "sft_jsonl"],
    pool="gpu",
    description="LoRA SFT adapter, trained out of process through Dagster Pipes: `accelerate launch` with the "
    "DeepSpeed ZeRO-2 config runs riskva_assets.pipes_train on every rank; rank 0 alone streams logs and "
    "reports the materialization. Cancelling the run sends SIGTERM to every rank: each saves a checkpoint "
    "and exits. Runs in the `gpu` pool (limit 1). Never automated: train on purpose (schedule or Launchpad).",
)
def lora_adapter(context: dg.AssetExecutionContext, config: TrainConfig, paths: DataRootResource,
                 launcher: TrainingLauncher) -> dg.MaterializeResult:
    root = paths.layout()
    version = context.partition_key
    out = root.train_dir(version)
    recipe, train_args = config.train_args()
    args = [
        "--model_name_or_path", base_model_location(paths, launcher, version),
        "--dataset_path", str(root.prepared_dir(version, "jsonl")),
        "--output_dir", str(out),
        *train_args,
    ]
    command = launcher.command(args)
    context.log.info("training: " + lineage_command(command))
    invocation = launcher.client().run(context=context, command=command, env=launcher.env_vars())
    reported = invocation.get_materialize_result()
    reported_dir = (reported.metadata or {}).get("adapter_dir")
    adapter = Path(getattr(reported_dir, "value", reported_dir)) if reported_dir else out / "adapter"
    digest = lineage.folder_hash(adapter, ("adapter_*", "*.json"))
    return dg.MaterializeResult(
        metadata={
            **(reported.metadata or {}),
            "adapter": dg.MetadataValue.path(str(adapter)),
            "num_processes": launcher.num_processes,
            "recipe": recipe,
            "command": dg.MetadataValue.md(f"```\n{lineage_command(command)}\n```"),
        },
        data_version=reported.data_version or dg.DataVersion(digest[:16]),
    )


def lineage_command(command: list[str]) -> str:
    from .pipes_client import format_command

    return format_command(command)


@dg.asset(
    partitions_def=dataset_version,
    group_name=MODEL,
    kinds={"pytorch", "safetensors"},
    code_version=CODE_VERSION,
    deps=["lora_adapter", "base_model"],
    description="Base model with the LoRA adapter merged in (riskva_core.merge), with the equivalence "
    "report: merged and base+adapter give the same logits on probe inputs.",
)
def merged_model(context: dg.AssetExecutionContext, paths: DataRootResource,
                 launcher: TrainingLauncher) -> dg.MaterializeResult:
    from riskva_core.merge import MergeConfig, merge

    root = paths.layout()
    version = context.partition_key
    out = root.merged_dir(version)
    report = merge(MergeConfig(base_model_path=Path(base_model_location(paths, launcher, version)),
                               adapter_path=root.train_dir(version) / "adapter", output_dir=out))
    digest = lineage.folder_hash(out, ("*.safetensors", "*.json"))
    summary = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    return dg.MaterializeResult(
        metadata={
            "merged_model": dg.MetadataValue.path(str(out)),
            "bytes": lineage.folder_bytes(out),
            "merge_report": dg.MetadataValue.json(report),
            **{f"merge/{k}": v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
        },
        data_version=dg.DataVersion(digest[:16]),
    )


# ----------------------------------------------------------------------------- registry
def _example_image(paths: DataRootResource, version: str) -> bytes:
    from riskva_core.samples import read_samples

    root = paths.layout()
    for split in ("test", "val", "train"):
        samples = read_samples(root.prepared_dir(version, "parquet"), split)
        if samples and samples[0].image_bytes:
            return samples[0].image_bytes
    raise RiskvaError(f"dataset version {version}: the prepared Parquet has no samples for an input example")


class RegisterConfig(dg.Config):
    max_new_tokens: int = Field(default=256, description="generation length of the served pyfunc (model_config)")
    batch_size: int = Field(default=4, description="images per generate() batch in the served pyfunc")


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow"},
    code_version=CODE_VERSION,
    deps=["merged_model", "sft_parquet", "sft_jsonl", "raw_metadata"],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
    description="The merged model logged to MLflow as the RisKVA pyfunc (image bytes/base64 → four report "
    "fields + raw text; signature and input example set), registered as a new version of `riskva`, "
    "tagged with its lineage and given the alias `challenger`.",
)
def registered_model(context: dg.AssetExecutionContext, config: RegisterConfig, paths: DataRootResource,
                     mlflow: MlflowResource) -> dg.MaterializeResult:
    root = paths.layout()
    version = context.partition_key
    registry = mlflow.registry()
    merged = root.merged_dir(version)
    upstream = lineage.upstream_data_versions(context, ["raw_metadata", "sft_jsonl", "sft_parquet", "base_model",
                                                        "lora_adapter", "merged_model"])
    tags = {
        "dataset_version": version,
        "dagster_run_id": context.run_id,
        "code_version": CODE_VERSION,
        **{f"data_version.{k}": v for k, v in upstream.items()},
    }
    commit = lineage.git_commit()
    if commit:
        tags["git_commit"] = commit
    dataset_info = root.prepared_dir(version, "parquet") / "dataset_info.json"
    rv = registry.log_model(
        merged,
        example_image=_example_image(paths, version),
        tags=tags,
        params={"dataset_version": version, "merged_model": str(merged)},
        extra_artifacts={"dataset": dataset_info, "merge": merged / "merge_report.json"},
        run_name=f"register-{version}",
        model_config={"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size},
    )
    registry.set_alias(reg.ALIAS_CHALLENGER, rv.version)
    return dg.MaterializeResult(
        metadata={
            "model_name": rv.name,
            "model_version": rv.version,
            "model_uri": rv.model_uri,
            "challenger_uri": registry.model_uri(reg.ALIAS_CHALLENGER),
            "mlflow_run_id": rv.run_id,
            "mlflow_url": dg.MetadataValue.url(registry.version_url(rv.version)),
            "tags": dg.MetadataValue.json(tags),
        },
        data_version=dg.DataVersion(lineage.text_hash(rv.name, rv.version, upstream.get("merged_model", ""))[:16]),
    )


def _registered_version(context: dg.AssetExecutionContext) -> str:
    return str(_upstream_metadata(context, "registered_model")["model_version"])


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow", "pandas"},
    code_version=CODE_VERSION,
    deps=["registered_model", "sft_parquet"],
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Batch inference of the registered challenger (models:/riskva/<version registered for this "
    "partition>, i.e. @challenger when it is the newest) on the test split, scored by riskva_core.evaluate: "
    "report.json/.md/.html. Headline metrics are also logged on the model version.",
)
def evaluation_report(context: dg.AssetExecutionContext, paths: DataRootResource,
                      mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core.evaluate import evaluate
    from riskva_core.promotion import headline
    from riskva_core.pyfunc import predict_split

    root = paths.layout()
    version = context.partition_key
    registry = mlflow.registry()
    model_version = _registered_version(context)
    registry.activate()
    out = root.reports_dir(version)
    records = predict_split(registry.model_uri(model_version), root.prepared_dir(version, "parquet"), "test")
    from riskva_core.atomic import write_text

    write_text(out / "predictions.jsonl",
               "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    report = evaluate(records, out / "report", image_root=root.prepared_dir(version, "parquet"))
    heads = {k: v for k, v in headline(report).items() if v is not None}
    desc_rouge = (report.get("text", {}).get(FIELD_DESC) or {}).get("rouge_l_char")
    if desc_rouge is not None:  # the demo's third target: can the model say what it sees
        heads["desc_rouge_l_char"] = desc_rouge
    registry.log_metrics(model_version, heads)
    registry.set_tags(model_version, {"eval.report": str(out / "report" / "report.html"), "eval.n": report["n"]})
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    confusion = report["risk_level"].get("confusion")
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(md),
            "report_html": dg.MetadataValue.path(str(out / "report" / "report.html")),
            "report_json": dg.MetadataValue.path(str(out / "report" / "report.json")),
            "model_uri": registry.model_uri(model_version),
            "n": int(report["n"]),
            **{k: float(v) for k, v in heads.items()},
            "confusion_matrix": dg.MetadataValue.md(_confusion_md(confusion)) if confusion else "n/a",
            "mlflow_url": dg.MetadataValue.url(registry.version_url(model_version)),
        },
        data_version=dg.DataVersion(lineage.file_sha256(out / "report" / "report.json")[:16]),
    )


def _confusion_md(confusion: Any) -> str:
    if isinstance(confusion, dict) and "labels" in confusion and "matrix" in confusion:
        labels, matrix = confusion["labels"], confusion["matrix"]
    elif isinstance(confusion, dict):
        labels = list(confusion)
        matrix = [[confusion[t].get(p, 0) for p in labels] for t in labels]
    else:
        return f"```\n{json.dumps(confusion, ensure_ascii=False)}\n```"
    return _md_table(["truth \\ predicted", *labels], [[t, *row] for t, row in zip(labels, matrix)])


class PromotionConfig(dg.Config):
    min_parse_rate: float = Field(default=0.95, description="absolute: challenger parse rate at least this")
    min_level_accuracy: float = Field(default=0.0, description="absolute: 风险等级 accuracy at least this")
    min_severe_recall: float = Field(default=0.0, description="absolute: 严重 recall at least this")
    max_under_grading_rate: float = Field(default=1.0, description="absolute: under-grading at most this")
    margin: float = Field(default=0.0, description="non-inferiority margin vs champion (paired bootstrap)")
    n_resamples: int = Field(default=1000, description="bootstrap resamples")
    seed: int = Field(default=0, description="bootstrap seed")


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow"},
    code_version=CODE_VERSION,
    deps=["evaluation_report"],
    description="Challenger vs champion on this version's test split (paired bootstrap). The challenger "
    "becomes `champion` only if it meets the absolute thresholds and is not significantly worse on 风险等级 "
    "accuracy and severe recall. The decision and its reason are written to the version's tags.",
)
def champion_promotion(context: dg.AssetExecutionContext, config: PromotionConfig, paths: DataRootResource,
                       mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core import promotion
    from riskva_core.pyfunc import predict_split

    root = paths.layout()
    version = context.partition_key
    registry = mlflow.registry()
    registry.activate()
    challenger = _registered_version(context)
    out = root.reports_dir(version)
    report = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    chal_preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    thresholds = promotion.Thresholds(**config.model_dump())
    champion = registry.alias_version(reg.ALIAS_CHAMPION)
    comparisons = None
    if champion is not None and champion != challenger:
        champ_preds = predict_split(registry.model_uri(champion), root.prepared_dir(version, "parquet"), "test")
        from riskva_core.atomic import write_text

        write_text(out / f"champion_v{champion}_predictions.jsonl",
                   "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in champ_preds))
        comparisons = promotion.compare(chal_preds, champ_preds, thresholds)
    decision = promotion.decide(report, comparisons, thresholds, champion if comparisons is not None else None)
    aliases = promotion.apply_decision(registry, challenger, decision,
                                       {"dagster_run_id": context.run_id, "dataset_version": version})
    rows = [[m, s.get("n"), s.get("delta"), s.get("ci95"), s.get("p_value")] for m, s in decision.comparisons.items()]
    return dg.MaterializeResult(
        metadata={
            "decision": "promoted" if decision.promote else "kept as challenger",
            "reason": decision.reason,
            "challenger_version": challenger,
            "champion_before": champion or "none",
            "aliases": dg.MetadataValue.json(aliases),
            "comparison": dg.MetadataValue.md(_md_table(["metric", "n", "Δ", "95% CI", "p"], rows))
            if rows else "no champion to compare with",
            "mlflow_url": dg.MetadataValue.url(registry.version_url(challenger)),
        },
        data_version=dg.DataVersion(lineage.text_hash(json.dumps(decision.to_dict(), sort_keys=True))[:16]),
    )


ALL_ASSETS = [raw_metadata, sft_jsonl, sft_parquet, base_model, lora_adapter, merged_model, registered_model,
              evaluation_report, champion_promotion]
DATA_ASSETS = ["raw_metadata", "sft_jsonl", "sft_parquet"]
