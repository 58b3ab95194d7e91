"""Registry assets: the MLflow model version, its evaluation report and champion promotion."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

import dataclasses
import json
from typing import Optional

import dagster as dg
from pydantic import Field

from riskva_core.registry import client as reg
from riskva_core.registry import evidence
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

from . import lineage
from .asset_metadata import CODE_VERSIONS, REGISTRY, confusion_table, json_or_none, md_table, rounded, upstream_metadata
from .model_assets import lineage_problem
from .partitions import dataset_version
from .resources import DataRootResource, MlflowResource
from riskva_core.launch.resume import lineage_tags

# Run tag (set when the MLflow run starts, before the version exists) naming the merged model's content
# hash: a retry or re-execution finds the version already logged for the same content and reuses it.
MERGED_SHA_TAG = "riskva.merged_model_sha"


def _example_image(paths: DataRootResource, version: str) -> bytes:
    from riskva_core.data.samples import read_samples

    root = paths.layout()
    for split in ("test", "val", "train"):
        samples = read_samples(root.prepared_dir(version, "parquet"), split)
        if samples and samples[0].image_bytes:
            return samples[0].image_bytes
    raise RiskvaError(f"dataset version {version}: the prepared Parquet has no samples for an input example")


class RegisterConfig(dg.Config):
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS,
                                description="generation length of the served pyfunc (model_config)")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, description="images per generate() batch in the served "
                            "pyfunc; concurrent requests to `riskva serve --api openai` share one")
    torch_dtype: str = Field(default="auto", description="dtype of every load of the version (model_config): auto "
                             "(a bf16 checkpoint stays bf16 on a CPU) | bfloat16 | float32")


def stale_merge_problem(merged, adapter_dir) -> Optional[str]:
    """Why ``merged`` must not be registered, or None: it must hold a merge report whose check passed
    (model_assets.merge_verdict reads the report's verdict keys) for the adapter now in ``adapter_dir``.

    A refused merge writes nothing, so the previous merge's folder stays: without this, the next
    registration would log weights of an older adapter under the new lineage.
    """
    from .model_assets import merge_verdict

    report = json_or_none(merged / "merge_report.json")
    if report is None:
        return f"{merged}: no merge_report.json, so no verified merge wrote this folder"
    passed, detail = merge_verdict(report)
    if not passed:
        return f"{merged}: its merge check failed ({detail})"
    weights = adapter_dir / "adapter_model.safetensors"
    current = lineage.file_sha256(weights) if weights.is_file() else None
    recorded = report.get("adapter_sha256")
    if current is None:
        return (f"{merged} was merged from adapter {str(recorded)[:12]}, and there is no adapter at {adapter_dir} now "
                "(a newer lora_adapter run moved it aside and did not finish): materialize lora_adapter, then "
                "merged_model")
    if recorded != current:
        return (f"{merged} was merged from adapter {str(recorded)[:12]}, not from the current adapter {current[:12]} "
                f"({weights}): the newest merge did not complete, so this folder is stale")
    return None


def merged_lineage_problem(context: dg.AssetExecutionContext, merged) -> Optional[str]:
    """Why the adapter lineage the merge report carries forbids registering ``merged`` now, or None."""
    report = json_or_none(merged / "merge_report.json")
    record = report.get("adapter_lineage") if report is not None else None
    if report is None:
        return None  # stale_merge_problem names the missing report
    if not isinstance(record, dict):
        return (f"{merged}: its merge report carries no adapter lineage record (merged before lineage records "
                "were kept): materialize lora_adapter, then merged_model")
    return lineage_problem(context, record, f"{merged} was merged from an adapter that")


def registry_tags(report: dict, merged_sha: str, run_id: str) -> dict[str, str]:
    """The version's tags, all from what produced the weights: the adapter's own lineage record (copied
    into the merge report), the merge that wrote them, and this registration's own code and run."""
    merged_by = report.get("merged_by") or {}
    return {
        **lineage_tags(report["adapter_lineage"]),
        **({"code_version.merged_model": merged_by["code_version"]} if merged_by.get("code_version") else {}),
        "code_version.registered_model": CODE_VERSIONS["registered_model"],
        "data_version.merged_model": merged_sha,
        MERGED_SHA_TAG: merged_sha,
        **({"merge.verdict": str(report["verdict"])} if report.get("verdict") else {}),
        "dagster_run_id": run_id,  # the run that registered the version
        f"dagster_run.{run_id}": "registered",
    }


def find_registered(registry: reg.Registry, merged_sha: str) -> Optional[reg.RegisteredVersion]:
    """The version already registered from a merged model with this content hash, if any.

    Looks up MLflow runs by the run tag (written at run start) and then the version of each run,
    newest first; a run that crashed before registering has no version and is skipped.
    """
    from mlflow.entities import ViewType

    client = registry.client()
    experiment_id = registry.activate()
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{MERGED_SHA_TAG}` = '{merged_sha}'",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"])
    for run in runs:
        versions = client.search_model_versions(f"name='{registry.model_name}' and run_id='{run.info.run_id}'")
        if versions:
            mv = max(versions, key=lambda v: int(v.version))
            return reg.RegisteredVersion(name=registry.model_name, version=str(mv.version),
                                         model_uri=registry.model_uri(str(mv.version)), run_id=run.info.run_id,
                                         model_id=getattr(mv, "model_id", None), source=mv.source)
    return None


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow"},
    code_version=CODE_VERSIONS["registered_model"],
    pool="gpu",  # loads the model onto the accelerator: one such asset at a time
    deps=["merged_model", "sft_parquet", "sft_jsonl", "raw_metadata"],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
    description="The merged model logged to MLflow as the RisKVA pyfunc (image bytes/base64 → four report "
    "fields + raw text; signature and input example set), registered as a new version of `riskva`, "
    "tagged with the lineage of its weights: the adapter's own record (data versions, training code version, "
    "base model, config and seed, copied into the merge report), the merge's code version and verdict; never "
    "the state at registration. Refuses a merge whose adapter record does not match the current upstream. "
    "Given the alias `challenger`. Idempotent: a retry or re-execution for the same merged-model content "
    "reuses the version already registered, keeps its tags and adds this run's id as a new tag.",
)
def registered_model(context: dg.AssetExecutionContext, config: RegisterConfig, paths: DataRootResource,
                     mlflow: MlflowResource) -> dg.MaterializeResult:
    root = paths.layout()
    version = context.partition_key
    registry = mlflow.registry()
    merged = root.merged_dir(version)
    problem = merged_lineage_problem(context, merged) or stale_merge_problem(merged, root.train_dir(version) / "adapter")
    if problem is not None:  # retrying cannot make the folder current: fail once, saying why
        raise dg.Failure(description=f"registered_model refuses to register: {problem}", allow_retries=False)
    upstream = lineage.upstream_data_versions(context, ["merged_model"])
    merged_sha = upstream.get("merged_model") or lineage.folder_hash(merged, ("*.safetensors", "*.json"))[:16]
    report = json_or_none(merged / "merge_report.json") or {}
    tags = registry_tags(report, merged_sha, context.run_id)
    rv = find_registered(registry, merged_sha)
    reused = rv is not None
    if rv is not None:
        context.log.info(f"merged model {merged_sha} is already registered as version {rv.version}: reusing it")
        # Same weights: the version keeps the lineage it was registered with. This run is added as a
        # tag of its own; only tags the version lacks (a registration killed before tagging) are filled.
        existing = dict(registry.get_version(rv.version).tags or {})
        differ = sorted(k for k in lineage_tags(report["adapter_lineage"]) if k in existing and existing[k] != tags[k])
        if differ:
            context.log.warning(f"version {rv.version} keeps its lineage tags; this merge's adapter record differs "
                                f"on {', '.join(differ)} (same weights from another run)")
        added = {**{k: v for k, v in tags.items() if k not in existing}, f"dagster_run.{context.run_id}": "reused"}
        registry.set_tags(rv.version, added)
        tags = {**existing, **added}
    else:
        dataset_info = root.prepared_dir(version, "parquet") / "dataset_info.json"
        rv = registry.log_model(
            merged,
            example_image=_example_image(paths, version),
            tags=tags,
            params={"dataset_version": version, "merged_model": str(merged)},
            extra_artifacts={"dataset": dataset_info, "merge": merged / "merge_report.json"},
            run_name=f"register-{version}",
            model_config={"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                          "torch_dtype": config.torch_dtype},
        )
    registry.set_alias(reg.ALIAS_CHALLENGER, rv.version)
    return dg.MaterializeResult(
        metadata={
            "model_name": rv.name,
            "model_version": rv.version,
            "reused_existing_version": reused,
            "model_uri": rv.model_uri,
            "challenger_uri": registry.model_uri(reg.ALIAS_CHALLENGER),
            "mlflow_run_id": rv.run_id,
            "mlflow_url": dg.MetadataValue.url(registry.version_url(rv.version)),
            "tags": dg.MetadataValue.json(tags),
        },
        data_version=dg.DataVersion(lineage.text_hash(rv.name, rv.version, merged_sha)[:16]),
    )


def _registered_version(context: dg.AssetExecutionContext) -> str:
    return str(upstream_metadata(context, "registered_model")["model_version"])


class ThresholdsConfig(dg.Config):
    """Absolute thresholds of the promotion rule (riskva_core.registry.promotion.Thresholds)."""

    min_parse_rate: float = Field(default=0.9, description="absolute: challenger parse rate at least this")
    min_level_accuracy: float = Field(default=0.0, description="absolute: 风险等级 accuracy at least this")
    beat_majority_baseline: bool = Field(default=True, description="absolute: 风险等级 accuracy above always "
                                         "answering the test split's most frequent level")
    min_severe_recall: float = Field(default=0.0, description="absolute: 严重 recall at least this")
    max_under_grading_rate: float = Field(default=1.0, description="absolute: under-grading at most this")


class PromotionConfig(ThresholdsConfig):
    margin: float = Field(default=0.02, description="non-inferiority margin: on accuracy, severe recall and parse "
                          "rate the lower 95% bound of challenger − champion must be above −margin")
    n_resamples: int = Field(default=1000, description="bootstrap resamples")
    power: float = Field(default=0.8, description="the power at which an inconclusive decision names the test "
                         "photos (severe recall: 严重 photos) that would show non-inferiority")
    seed: int = Field(default=0, description="bootstrap seed")


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow", "pandas"},
    code_version=CODE_VERSIONS["evaluation_report"],
    pool="gpu",  # loads the model onto the accelerator: one such asset at a time
    deps=["registered_model", "sft_parquet"],
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
    check_specs=[dg.AssetCheckSpec(
        "meets_thresholds", asset="evaluation_report",
        description="the absolute promotion thresholds (this asset's config; champion_promotion applies its "
        "own copy) hold for this model version; a warning, not a block: a failing model is still reported",
    )],
    description="Batch inference of the registered challenger (models:/riskva/<version registered for this "
    "partition>, i.e. @challenger when it is the newest) on the test split, scored by riskva_core.evaluate.report: "
    "report.json/.md/.html. Headline metrics are also logged on the model version; the check `meets_thresholds` "
    "records whether the absolute promotion thresholds hold.",
)
def evaluation_report(context: dg.AssetExecutionContext, config: ThresholdsConfig, paths: DataRootResource,
                      mlflow: MlflowResource) -> dg.MaterializeResult:
    from riskva_core.evaluate.predict import predict_split
    from riskva_core.evaluate.report import evaluate
    from riskva_core.registry import promotion
    from riskva_core.registry.promotion import headline

    root = paths.layout()
    version = context.partition_key
    registry = mlflow.registry()
    model_version = _registered_version(context)
    registry.activate()
    out = root.reports_dir(version)
    prepared = root.prepared_dir(version, "parquet")
    split_sha = evidence.test_split_sha256(prepared)
    generation: dict = {}
    # Every record and the report say which version answered, on which test split: promotion checks it.
    records = evidence.stamp(predict_split(registry.model_uri(model_version), prepared, "test", generation),
                             model_version, split_sha)
    from riskva_core.atomic import write_text

    write_text(out / "predictions.jsonl",
               "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    report = evaluate(records, out / "report", image_root=prepared, provenance={
        evidence.MODEL_VERSION: model_version, "model_uri": registry.model_uri(model_version),
        "dataset_version": version, evidence.TEST_SPLIT_SHA: split_sha, "generation": generation})
    heads = {k: v for k, v in headline(report).items() if v is not None}
    registry.log_metrics(model_version, heads)
    registry.set_tags(model_version, {"eval.report": str(out / "report" / "report.html"), "eval.n": report["n"]})
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    level = report["risk_level"]
    thresholds = promotion.Thresholds(**config.model_dump())
    failures = promotion.absolute_failures(report, thresholds)
    check = dg.AssetCheckResult(
        check_name="meets_thresholds", passed=not failures, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(failures) or "every absolute threshold holds",
        metadata={"thresholds": dg.MetadataValue.json(config.model_dump()),
                  "failures": dg.MetadataValue.json(failures)},
    )
    majority = ((report.get("baselines") or {}).get("majority") or {}).get("accuracy")
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(md),
            "report_html": dg.MetadataValue.path(str(out / "report" / "report.html")),
            "report_json": dg.MetadataValue.path(str(out / "report" / "report.json")),
            "model_uri": registry.model_uri(model_version),
            "test_split_sha256": split_sha,
            "generation": dg.MetadataValue.json(generation),
            "n": int(report["n"]),
            **{k: rounded(float(v)) for k, v in heads.items()},
            **({"majority_baseline_accuracy": rounded(float(majority))} if majority is not None else {}),
            "confusion_matrix": confusion_table(level["confusion"], level["labels"]),
            "mlflow_url": dg.MetadataValue.url(registry.version_url(model_version)),
        },
        data_version=dg.DataVersion(lineage.file_sha256(out / "report" / "report.json")[:16]),
        check_results=[check],
    )


@dg.asset(
    partitions_def=dataset_version,
    group_name=REGISTRY,
    kinds={"mlflow"},
    code_version=CODE_VERSIONS["champion_promotion"],
    pool="gpu",  # loads the model onto the accelerator: one such asset at a time
    deps=["evaluation_report"],
    description="Challenger vs champion on this version's test split (paired bootstrap over the split's "
    "near-duplicate groups), a non-inferiority "
    "rule with three outcomes (riskva_core.registry.promotion): promoted when it meets the absolute thresholds "
    "and, on 风险等级 accuracy, severe recall and parse rate, the lower end of the 95% interval of challenger − "
    "champion is above −margin; rejected when it misses a threshold or is measured worse; inconclusive (the "
    "champion stays) when an interval straddles −margin, with the test photos or margin that would settle it. "
    "Refuses predictions/reports that are not for this version and the current test split. The decision, "
    "its reason and the thresholds used are written to the version's tags.",
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
    prepared = root.prepared_dir(version, "parquet")
    report = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    chal_preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    # Decide only on evidence for this challenger on the test split as it is now.
    split_sha = evidence.test_split_sha256(prepared)
    try:
        evidence.require(chal_preds, report, challenger, split_sha)
    except RiskvaError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    thresholds = promotion.Thresholds(**config.model_dump())
    champion = registry.alias_version(reg.ALIAS_CHAMPION)
    comparisons = None
    if champion is not None and champion != challenger:
        champ_preds = evidence.stamp(predict_split(registry.model_uri(champion), prepared, "test"), champion, split_sha)
        from riskva_core.atomic import write_text

        write_text(out / f"champion_v{champion}_predictions.jsonl",
                   "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in champ_preds))
        comparisons = promotion.compare(chal_preds, champ_preds, thresholds)
    if champion is not None and champion == challenger:
        # A re-execution whose registration reused the serving version: nothing to compare or move.
        decision = promotion.Decision(promote=True, reason=f"v{challenger} is already the champion (same merged "
                                      "model re-registered); aliases unchanged", champion_version=champion,
                                      thresholds=dataclasses.asdict(thresholds))
    else:
        decision = promotion.decide(report, comparisons, thresholds, champion,
                                    merge_verdict=promotion.merge_verdict_of(registry, challenger))
    aliases = promotion.apply_decision(registry, challenger, decision,
                                       {"dagster_run_id": context.run_id, "dataset_version": version})
    rows = [[m, st.get("n"), rounded(st.get("delta")), rounded(st.get("ci95")), st.get("outcome"),
             rounded(st.get("min_margin")), st.get("photos_needed")] for m, st in decision.comparisons.items()]
    return dg.MaterializeResult(
        metadata={
            "decision": decision.outcome,
            "reason": decision.reason,
            "challenger_version": challenger,
            "champion_before": champion or "none",
            "thresholds": dg.MetadataValue.json(decision.thresholds),
            "aliases": dg.MetadataValue.json(aliases),
            "comparison": dg.MetadataValue.md(md_table(
                ["metric", "n", "Δ", "95% CI", "outcome", "smallest margin shown", "test photos needed"], rows))
            if rows else "no champion to compare with",
            "mlflow_url": dg.MetadataValue.url(registry.version_url(challenger)),
        },
        data_version=dg.DataVersion(lineage.text_hash(json.dumps(decision.to_dict(), sort_keys=True))[:16]),
    )
