"""Model assets: the demo base model, the LoRA adapter (a DeepSpeed job through Pipes), the merge."""
# No `from __future__ import annotations`: Dagster reads the config/context annotations at runtime.

from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from riskva_core.train.recipes import DEMO_CPU_MODEL_SIZE

from . import lineage
from .asset_metadata import CODE_VERSION, MODEL, json_or_none
from .partitions import dataset_version
from .resources import DataRootResource, TrainingLauncher


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
    extra_args: list[str] = Field(default_factory=list, description="more riskva_core.train flags, verbatim: "
                                  "any TrainingArguments flag too (--eval_strategy steps, --optim …)")

    def train_args(self) -> tuple[str, list[str]]:
        """(recipe used, flags): the recipe's flags, then every field set here (last flag wins)."""
        from riskva_core.train.recipes import resolve

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
    description="Base model with the LoRA adapter merged in (riskva_core.model.merge), with the equivalence "
    "report: merged and base+adapter give the same logits on probe inputs.",
)
def merged_model(context: dg.AssetExecutionContext, paths: DataRootResource,
                 launcher: TrainingLauncher) -> dg.MaterializeResult:
    from riskva_core.model.merge import MergeConfig, merge

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
