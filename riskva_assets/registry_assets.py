"""Registry assets: the MLflow model version, its evaluation report and champion promotion."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import json
from typing import Any

import dagster as dg
from pydantic import Field

from riskva_core.registry import client as reg
from riskva_core.errors import RiskvaError

from . import lineage
from .asset_metadata import CODE_VERSION, REGISTRY, md_table, upstream_metadata
from .partitions import dataset_version
from .resources import DataRootResource, MlflowResource


def _example_image(paths: DataRootResource, version: str) -> bytes:
    from riskva_core.data.samples import read_samples

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
    pool="gpu",  # loads the model onto the accelerator: one such asset at a time
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
    return str(upstream_metadata(context, "registered_model")["model_version"])


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow", "pandas"},
    code_version=CODE_VERSION,
    pool="gpu",  # loads the model onto the accelerator: one such asset at a time
    deps=["registered_model", "sft_parquet"],
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    description="Batch inference of the registered challenger (models:/riskva/<version registered for this "
    "partition>, i.e. @challenger when it is the newest) on the test split, scored by riskva_core.evaluate.report: "
    "report.json/.md/.html. Headline metrics are also logged on the model version.",
)
def evaluation_report(context: dg.AssetExecutionContext, paths: DataRootResource,
                      mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core.evaluate.report import evaluate
    from riskva_core.registry.promotion import headline
    from riskva_core.evaluate.predict import predict_split

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
    return md_table(["truth \\ predicted", *labels], [[t, *row] for t, row in zip(labels, matrix)])


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
    pool="gpu",  # loads the model onto the accelerator: one such asset at a time
    deps=["evaluation_report"],
    description="Challenger vs champion on this version's test split (paired bootstrap). The challenger "
    "becomes `champion` only if it meets the absolute thresholds and is not significantly worse on 风险等级 "
    "accuracy and severe recall. The decision and its reason are written to the version's tags.",
)
def champion_promotion(context: dg.AssetExecutionContext, config: PromotionConfig, paths: DataRootResource,
                       mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core.registry import promotion
    from riskva_core.evaluate.predict import predict_split

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
            "comparison": dg.MetadataValue.md(md_table(["metric", "n", "Δ", "95% CI", "p"], rows))
            if rows else "no champion to compare with",
            "mlflow_url": dg.MetadataValue.url(registry.version_url(challenger)),
        },
        data_version=dg.DataVersion(lineage.text_hash(json.dumps(decision.to_dict(), sort_keys=True))[:16]),
    )
