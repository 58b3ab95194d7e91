"""Model assets: the demo base model, the LoRA adapter (a DeepSpeed job through Pipes), the merge."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from riskva_core.train.recipes import DEMO_CPU_MODEL_SIZE

from . import lineage
from .asset_metadata import CODE_VERSIONS, MODEL, json_or_none
from .partitions import dataset_version
from .launch_resources import TrainingFailed
from .resources import REPO_ROOT, DataRootResource, TrainingLauncher
from riskva_core.launch.resume import (LINEAGE_FILE, STOPPED_FILE, adapter_version, config_files_digest, finished_run_record,
                     identity_sha256, launcher_config_files, lineage_differences, mark_complete,
                     newest_superseded_lineage, plan_resume, read_lineage, run_identity, with_resume, write_lineage)

PIN_LINEAGE = "base_model.json"  # in the adapter folder: the pinned base it was trained on (merge uses it)


class BaseModelConfig(dg.Config):
    size: str = Field(default=DEMO_CPU_MODEL_SIZE, description="demo model size when no base_model_path: tiny | small")
    seed: int = Field(default=0, description="weight-initialisation seed of the demo model")


@dg.asset(
    partitions_def=dataset_version,
    group_name=MODEL,
    kinds={"pytorch", "huggingface"},
    code_version=CODE_VERSIONS["base_model"],
    deps=["sft_jsonl"],
    description="The base model to fine-tune. With TrainingLauncher.base_model_path set (a local folder, a "
    "hub id such as Qwen/Qwen2.5-VL-7B-Instruct resolved through the Hugging Face cache, or a models:/ URI) "
    "it is pinned once (a hub id to its snapshot commit, an MLflow alias to its version, downloaded once) and "
    "recorded with the recipe `auto` will pick for it; training and the merge then load that pinned copy. "
    "Otherwise the demo model is built: "
    "a small random-weight Qwen2.5-VL whose tokenizer is trained on this version's prepared text.",
)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, paths: DataRootResource,
               launcher: TrainingLauncher) -> dg.MaterializeResult:
    root = paths.layout()
    version = context.partition_key
    if launcher.base_model_path:
        from riskva_core.model.pin import pin_model_ref
        from riskva_core.train.recipes import recipe_for_model

        # A folder, a hub id (pinned to its snapshot commit) or an MLflow URI (pinned to a version and
        # downloaded here, once for the whole partition).
        pin = pin_model_ref(launcher.base_model_path, root.base_model_dir(version), "RISKVA_BASE_MODEL")
        local = Path(pin.local_path)
        digest = lineage.folder_hash(local, ("*.json", "*.txt", "*.jinja", "*.index.json"))
        if pin.revision:  # another commit or version is other weights, even with the same config files
            digest = lineage.text_hash(digest, pin.identity)
        context.log.info(f"base model {pin.ref} pinned to {pin.identity} at {local}")
        return dg.MaterializeResult(
            metadata={"base_model": launcher.base_model_path, "resolved": dg.MetadataValue.path(str(local.resolve())),
                      "built": False, "config_hash": digest, "pinned": pin.identity, "revision": pin.revision,
                      "pin": dg.MetadataValue.json(pin.to_dict()),
                      "recipe_auto": recipe_for_model(pin.local_path)},
            data_version=dg.DataVersion(digest[:16]),
        )
    from riskva_core.model.tiny import TinyModelConfig, build_tiny_model

    out = build_tiny_model(TinyModelConfig(output_dir=root.base_model_dir(version),
                                           dataset_path=root.prepared_dir(version, "jsonl"),
                                           size=config.size, seed=config.seed))
    info = json_or_none(out / "tiny_model_info.json") or {}
    digest = lineage.folder_hash(out)
    return dg.MaterializeResult(
        metadata={
            "base_model": dg.MetadataValue.path(str(out)),
            "built": True,
            "size": config.size,
            "recipe_auto": "demo",
            "parameters": int(info.get("parameters", 0)),
            "bytes": lineage.folder_bytes(out),
        },
        data_version=dg.DataVersion(digest[:16]),
    )


def base_model_location(paths: DataRootResource, launcher: TrainingLauncher, version: str) -> str:
    return launcher.base_model_path or str(paths.layout().base_model_dir(version))


def pinned_base(context: dg.AssetExecutionContext, paths: DataRootResource, launcher: TrainingLauncher,
                version: str):
    """The base model pinned by this partition's ``base_model`` materialization (pinned here, once, if
    there is none); the demo model's folder when no base is configured."""
    from riskva_core.errors import RiskvaError
    from riskva_core.model.pin import PinnedModel, pin_model_ref

    if not launcher.base_model_path:
        local = str(paths.layout().base_model_dir(version))
        return PinnedModel(ref=local, kind="folder", pinned_ref=local, local_path=local)
    from .asset_metadata import upstream_metadata

    try:
        recorded = upstream_metadata(context, "base_model").get("pin")
    except RiskvaError:
        recorded = None
    if isinstance(recorded, dict):
        pin = PinnedModel.from_dict(recorded)
        if pin.ref != launcher.base_model_path:
            raise RiskvaError(f"base_model of {version} was pinned for {pin.ref}, but RISKVA_BASE_MODEL is now "
                              f"{launcher.base_model_path}: materialize base_model again")
        if not Path(pin.local_path).is_dir():
            raise RiskvaError(f"the pinned base model {pin.identity} is no longer at {pin.local_path}: "
                              "materialize base_model again")
        return pin
    pin = pin_model_ref(launcher.base_model_path, paths.layout().base_model_dir(version), "RISKVA_BASE_MODEL")
    context.log.info(f"base_model has recorded no pin for {version}: pinned {pin.ref} to {pin.identity} now")
    return pin


def base_model_tags(adapter_dir: Path) -> dict[str, str]:
    """Registry tags naming the pinned base an adapter was trained on (empty for older adapters)."""
    pin = json_or_none(Path(adapter_dir) / PIN_LINEAGE) or {}
    return {f"base_model.{k}": str(pin[k]) for k in ("identity", "revision") if pin.get(k)}


class TrainConfig(dg.Config):
    """Training hyperparameters, editable in the Launchpad. Unset fields take the recipe's value."""

    recipe: str = Field(default="auto", description="auto (from the base model: demo for the demo tiny model, "
                        "lora for the 7B and any other model) | demo | lora | seed")
    max_steps: Optional[int] = Field(default=None, description="optimizer steps (overrides epochs)")
    num_train_epochs: Optional[float] = Field(default=None, description="epochs")
    learning_rate: Optional[float] = Field(default=None, description="peak learning rate")
    per_device_train_batch_size: Optional[int] = Field(default=None, description="batch size per rank")
    gradient_accumulation_steps: Optional[int] = Field(default=None, description="accumulation steps")
    lora_r: Optional[int] = Field(default=None, description="LoRA rank")
    lora_alpha: Optional[int] = Field(default=None, description="LoRA alpha")
    seed: Optional[int] = Field(default=None, description="training seed")
    extra_args: list[str] = Field(default_factory=list, description="more riskva_core.train flags, verbatim: "
                                  "any TrainingArguments flag too (--eval_strategy steps, --optim …)")

    def train_args(self, base_model: str) -> tuple[str, list[str]]:
        """(recipe used, flags): the recipe's flags, then every field set here (last flag wins).

        ``auto`` is decided by the base model being trained, never by this process's devices.
        """
        from riskva_core.train.recipes import resolve

        recipe, args = resolve(self.recipe, base_model)
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
    code_version=CODE_VERSIONS["lora_adapter"],
    deps=["base_model", "sft_jsonl"],
    pool="gpu",
    description="LoRA SFT adapter, trained out of process through Dagster Pipes: `accelerate launch` with the "
    "DeepSpeed ZeRO-2 config runs riskva_assets.pipes_rank on every rank; rank 0 alone streams logs and "
    "reports the materialization. Cancelling the run sends SIGTERM to every rank: each saves a checkpoint "
    "and exits. A retry or re-execution resumes from the newest checkpoint of the same data versions, pinned "
    "base model, training code, launcher config and training flags (run_identity.json beside the checkpoints; "
    "logging/save cadence/loader workers aside); checkpoints of anything else are moved to superseded/, and a "
    "finished run of the same identity is reused, never resumed. A run stopped by a SIGTERM Dagster did not "
    "send (preemption) is retried and resumed, TrainingLauncher.preemption_retries times. Runs in the `gpu` "
    "pool (limit 1). Never automated: train on purpose (schedule or Launchpad).",
)
def lora_adapter(context: dg.AssetExecutionContext, config: TrainConfig, paths: DataRootResource,
                 launcher: TrainingLauncher) -> dg.MaterializeResult:
    root = paths.layout()
    version = context.partition_key
    out = root.train_dir(version)
    pin = pinned_base(context, paths, launcher, version)
    recipe, train_args = config.train_args(pin.local_path)  # auto: from the weights actually trained
    args = [
        "--model_name_or_path", pin.pinned_ref,
        "--dataset_path", str(root.prepared_dir(version, "jsonl")),
        "--output_dir", str(out),
        *train_args,
    ]
    from riskva_core.errors import RiskvaError

    launcher_files = launcher_config_files(launcher.config_path(), args, REPO_ROOT)
    trained_on = lineage.trained_on_versions(context)
    try:
        identity = run_identity(args, {k: v for k, v in trained_on.items() if k in lineage.TRAINED_ON}, pin.identity,
                                launcher.ranks(), code_version=CODE_VERSIONS["lora_adapter"],
                                launcher_config_sha256=config_files_digest(launcher_files))
    except RiskvaError as exc:  # a flag that does not parse: nothing launched, nothing moved aside
        raise dg.Failure(description=f"lora_adapter: {exc}", allow_retries=False) from None
    adapter = out / "adapter"
    plan = plan_resume(out, identity, adapter_version(adapter))
    common = {"num_processes": launcher.ranks(), "recipe": recipe, "base_model_pinned": pin.identity,
              "run_identity": identity_sha256(identity)[:16],
              **({"superseded_checkpoints": dg.MetadataValue.path(str(plan.superseded))} if plan.superseded else {})}
    if plan.superseded:
        context.log.warning(f"checkpoints: {plan.why}")
    else:
        context.log.info(f"checkpoints: {plan.why}")
    if plan.action == "reuse":
        return dg.MaterializeResult(
            metadata={**common, "adapter": dg.MetadataValue.path(str(adapter)), "reused_finished_run": True,
                      "resumed": False, "trained_steps": 0, "step": plan.completed.get("step"),
                      "lineage": dg.MetadataValue.json(read_lineage(adapter) or {})},
            data_version=dg.DataVersion(plan.completed["adapter_version"]),
        )
    from riskva_core.train.checkpoint import list_checkpoints

    found = list_checkpoints(out) if plan.resume else []  # what --resume_from_checkpoint auto picks
    resumed_from = found[-1][0] if found else 0
    (out / STOPPED_FILE).unlink(missing_ok=True)
    command = launcher.command(with_resume(args, plan.resume))
    context.log.info("training: " + lineage_command(command))
    try:
        invocation = launcher.run(context, command, extra_env=pin.env())  # local | ray | k8s (launch_resources.py)
    except TrainingFailed:
        retry_if_preempted(context, out, launcher)
        raise
    retry_if_preempted(context, out, launcher)
    reported = invocation.get_materialize_result()
    reported_dir = (reported.metadata or {}).get("adapter_dir")
    adapter = Path(getattr(reported_dir, "value", reported_dir)) if reported_dir else adapter
    from riskva_core.atomic import write_json

    write_json(adapter / PIN_LINEAGE, pin.to_dict())  # the adapter's lineage: what it was trained on
    digest = lineage.folder_hash(adapter, ("adapter_*", "*.json"))
    data_version = reported.data_version or dg.DataVersion(digest[:16])
    step = getattr((reported.metadata or {}).get("step"), "value", None)
    fingerprint = getattr((reported.metadata or {}).get("dataset_fingerprint"), "value", None)
    # The finished run's record of what produced these weights, written now that they exist (never
    # before training: a run that fails leaves no record, and supersede() moved the old adapter aside).
    record = finished_run_record(
        identity, adapter, data_versions=trained_on, code_versions={"lora_adapter": identity["code_version"]},
        base_model={"name": launcher.base_model_path or "demo", "identity": pin.identity, "revision": pin.revision},
        step=step, dataset_version=version, dataset_fingerprint=fingerprint, git_commit=lineage.git_commit(),
        dagster_run_id=context.run_id)
    write_lineage(adapter, record)
    mark_complete(out, identity, data_version.value, step)
    return dg.MaterializeResult(
        metadata={
            **(reported.metadata or {}),
            **common,
            "adapter": dg.MetadataValue.path(str(adapter)),
            "resumed": plan.resume,
            "resumed_from_step": resumed_from,
            "trained_steps": step - resumed_from if isinstance(step, int) else None,
            "preemption_retries_used": context.retry_number,
            "launcher": launcher.launcher,
            "command": dg.MetadataValue.md(f"```\n{lineage_command(command)}\n```"),
            "lineage": dg.MetadataValue.json(record),
        },
        data_version=data_version,
    )


def retry_if_preempted(context: dg.AssetExecutionContext, out: Path, launcher: TrainingLauncher) -> None:
    """A run that stopped after its checkpoint on a SIGTERM Dagster did not send (a Dagster cancel
    never gets here: the client re-raises it) is retried; the retry resumes from that checkpoint."""
    stopped = json_or_none(out / STOPPED_FILE)
    if stopped is None:
        return
    context.log.warning(f"training was stopped by a signal Dagster did not send (preemption?) after saving "
                        f"checkpoint-{stopped.get('step')}; retry {context.retry_number + 1} of at most "
                        f"{launcher.preemption_retries} resumes from it")
    raise dg.RetryRequested(max_retries=launcher.preemption_retries) from None


def lineage_command(command: list[str]) -> str:
    import shlex

    return shlex.join(command)


def current_upstream(context: dg.AssetExecutionContext) -> tuple[dict[str, str], dict[str, str]]:
    """(data versions, code versions) an adapter trained now would record: what lineage records are
    compared with."""
    return lineage.trained_on_versions(context), {"lora_adapter": CODE_VERSIONS["lora_adapter"]}


def lineage_problem(context: dg.AssetExecutionContext, record: dict, what: str) -> Optional[str]:
    """One line when ``record`` (an adapter's lineage) does not match the current upstream, else None."""
    diffs = lineage_differences(record, *current_upstream(context))
    if not diffs:
        return None
    return (f"{what} was trained on {', '.join(diffs)} (recorded vs now): materialize lora_adapter for "
            f"{context.partition_key}, then merged_model")


def adapter_problem(context: dg.AssetExecutionContext, train_dir: Path) -> Optional[str]:
    """Why the adapter in ``train_dir`` must not be merged now, in one line, or None."""
    adapter = train_dir / "adapter"
    now = adapter_version(adapter)
    todo = f"materialize lora_adapter for {context.partition_key}"
    if now is None:
        moved = newest_superseded_lineage(train_dir)
        if moved is None:
            return f"no adapter at {adapter}: {todo}"
        diffs = lineage_differences(moved[1] or {}, *current_upstream(context))
        return (f"no finished adapter at {adapter}: a newer lora_adapter run moved the last one to {moved[0]} and "
                f"did not finish" + (f" (that one was trained on {', '.join(diffs)}, recorded vs now)" if diffs else "")
                + f": {todo}")
    record = read_lineage(adapter)
    if record is None:
        return f"{adapter} has no lineage record ({LINEAGE_FILE}, written when a lora_adapter run finishes): {todo}"
    if record.get("adapter_version") != now:
        return (f"{adapter}: its weights ({now}) are not the ones its lineage record describes "
                f"({record.get('adapter_version')}): {todo}")
    return lineage_problem(context, record, f"the adapter at {adapter}")


def merge_verdict(report: dict) -> tuple[bool, str]:
    """Whether a merge report lets its model be registered, and the account behind it: the report's
    ``verdict`` when it has one (``equivalent``, or ``unverifiable``: the gate could not tell a lost
    adapter from a kept one, so evaluation judges it), else its ``equivalent`` flag, else every
    logit difference below the tolerance (older reports)."""
    if "verdict" in report:
        return (report["verdict"] in ("equivalent", "unverifiable"),
                f"{report.get('verdict_reason') or report['verdict']}")
    tol = report.get("tolerance_abs", report.get("tolerance"))
    diffs = {k: report.get(k) for k in ("max_abs_logit_diff", "reload_max_abs_logit_diff")}
    measured = tol is not None and diffs["max_abs_logit_diff"] is not None
    text = (", ".join(f"{k}={float(v):.3g}" for k, v in diffs.items() if v is not None) + f" (tolerance {tol:.3g})"
            if measured else "")
    if "equivalent" in report:
        return bool(report["equivalent"]), text or str(report.get("reason", ""))
    if not measured:
        return False, "merge report has no logit difference or tolerance"
    return all(float(v) <= float(tol) for v in diffs.values() if v is not None), text


def merge_check(report: dict) -> dg.AssetCheckResult:
    """The `merge_equivalent` check of a saved merge: passed when equivalent; an ``unverifiable``
    verdict fails it at WARN severity, which does not block registration (evaluation judges)."""
    passed, detail = merge_verdict(report)
    unverifiable = report.get("verdict") == "unverifiable"
    return dg.AssetCheckResult(check_name="merge_equivalent", passed=passed and not unverifiable,
                               severity=dg.AssetCheckSeverity.WARN if unverifiable else dg.AssetCheckSeverity.ERROR,
                               description=detail, metadata={"verdict": str(report.get("verdict", "-"))})


@dg.asset(
    partitions_def=dataset_version,
    group_name=MODEL,
    kinds={"pytorch", "safetensors"},
    code_version=CODE_VERSIONS["merged_model"],
    deps=["lora_adapter", "base_model"],
    pool="gpu",
    check_specs=[dg.AssetCheckSpec(
        "merge_equivalent", asset="merged_model", blocking=True,
        description="merged and base+adapter give the same logits (merge_report.json); blocks registration "
        "when they do not; fails at WARN, not blocking, when the verdict is unverifiable (the adapter's effect "
        "is within the merge's own noise: evaluation judges)",
    )],
    description="Base model with the LoRA adapter merged in (riskva_core.model.merge) in the base's dtype, "
    "with the report: the saved model and base+adapter give the same logits on a probe input, and how much "
    "of each layer's LoRA update survived the cast. The blocking check `merge_equivalent` stops registration "
    "when the verification fails. Refuses (one line: what differs, what to run) an adapter whose lineage record "
    "(adapter/lineage.json) does not match the current prepared data, base model and training code, and copies "
    "that record into merge_report.json (`adapter_lineage`). In the `gpu` pool.",
)
def merged_model(context: dg.AssetExecutionContext, paths: DataRootResource,
                 launcher: TrainingLauncher) -> dg.MaterializeResult:
    from riskva_core.errors import RiskvaError
    from riskva_core.model.merge import MergeConfig, merge

    from riskva_core.atomic import write_json

    root = paths.layout()
    version = context.partition_key
    out = root.merged_dir(version)
    problem = adapter_problem(context, root.train_dir(version))
    if problem is not None:  # merging cannot make the adapter current: fail once, saying why
        raise dg.Failure(description=f"merged_model refuses to merge: {problem}", allow_retries=False)
    record = read_lineage(root.train_dir(version) / "adapter")
    try:
        adapter = root.train_dir(version) / "adapter"
        # The pinned copy the adapter was trained on, never a second look-up of a moving reference.
        base = (json_or_none(adapter / PIN_LINEAGE) or {}).get("local_path")
        report = merge(MergeConfig(base_model_path=base or base_model_location(paths, launcher, version),
                                   adapter_path=adapter, output_dir=out))
    except RiskvaError as exc:
        # Verification failed (nothing written): record why on the check; registration does not run.
        return dg.MaterializeResult(
            metadata={"error": str(exc)},
            data_version=dg.DataVersion(lineage.text_hash("merge-failed", str(exc))[:16]),
            check_results=[dg.AssetCheckResult(check_name="merge_equivalent", passed=False,
                                               severity=dg.AssetCheckSeverity.ERROR, description=str(exc))],
        )
    # The report carries the adapter's own record: registration tags the version from it.
    report = {**(json_or_none(out / "merge_report.json") or report), "adapter_lineage": record,
              "merged_by": {"code_version": CODE_VERSIONS["merged_model"]}}
    write_json(out / "merge_report.json", report)
    check = merge_check(report)
    digest = lineage.folder_hash(out, ("*.safetensors", "*.json"))
    summary = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    return dg.MaterializeResult(
        metadata={
            "merged_model": dg.MetadataValue.path(str(out)),
            "bytes": lineage.folder_bytes(out),
            "merge_report": dg.MetadataValue.json(report),
            **{f"merge/{k}": float(f"{v:.3g}") if isinstance(v, float) else v
               for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
        },
        data_version=dg.DataVersion(digest[:16]),
        check_results=[check],
    )
