"""Training configuration: one dataclass, validated on construction, and its argparse mirror.

Flag names follow the seed's ``custom_sft_vlm.py`` (``--use_lora True``, ``--lora_r 64`` …),
so the seed's launch lines keep working; boolean flags accept both the bare form
(``--bf16``) and an explicit value (``--use_lora True`` / ``--use_lora false``).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from riskva_core.errors import RiskvaError

LORA_TARGETS_DEFAULT = "q_proj,v_proj,k_proj,o_proj,gate_proj,up_proj,down_proj"
# Which language-model sub-module owns each projection name (Qwen2.5-VL decoder layer).
LM_LINEAR_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
REPORT_TO = ("tensorboard", "mlflow")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y", "on"}:
        return True
    if text in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    model_name_or_path: str
    dataset_path: Path
    output_dir: Path
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-6
    merger_lr: float | None = None
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    use_lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: str = LORA_TARGETS_DEFAULT
    tune_vision: bool = False
    tune_merger: bool = False
    train_lm_head: bool = False
    min_pixels: int = 56 * 56
    max_pixels: int = 1280 * 28 * 28
    max_length: int = 2048
    cache_images: bool = False
    augment_flip: bool = False
    dataloader_num_workers: int = 0
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 500
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = None
    report_to: str = "tensorboard"
    prompt_config: Path | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        self.dataset_path = Path(self.dataset_path)
        self.output_dir = Path(self.output_dir)
        if self.prompt_config is not None:
            self.prompt_config = Path(self.prompt_config)
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                    "max_length", "logging_steps", "min_pixels", "max_pixels", "save_total_limit")
        for name in positive:
            if getattr(self, name) <= 0:
                raise RiskvaError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "dataloader_num_workers", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise RiskvaError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise RiskvaError("set --num_train_epochs > 0 or --max_steps > 0")
        if not self.learning_rate > 0:
            raise RiskvaError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.merger_lr is not None and not self.merger_lr > 0:
            raise RiskvaError(f"--merger_lr must be positive, got {self.merger_lr}")
        if self.merger_lr is not None and not self.tune_merger:
            raise RiskvaError("--merger_lr needs --tune_merger: the merger is frozen otherwise")
        if not 0 <= self.warmup_ratio < 1:
            raise RiskvaError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise RiskvaError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise RiskvaError(f"--lr_scheduler must be cosine, linear or constant, got {self.lr_scheduler!r}")
        if self.min_pixels > self.max_pixels:
            raise RiskvaError(f"--min_pixels {self.min_pixels} exceeds --max_pixels {self.max_pixels}")
        unknown = [t for t in self.lora_targets if t not in LM_LINEAR_PARENTS]
        if unknown or not self.lora_targets:
            raise RiskvaError(
                f"--lora_target_modules: {unknown or 'empty'} not language-model projections; "
                f"choose from {','.join(LM_LINEAR_PARENTS)}"
            )
        reports = [r for r in self.report_to.split(",") if r.strip()]
        bad = [r for r in reports if r.strip() not in REPORT_TO + ("none",)]
        if bad:
            raise RiskvaError(f"--report_to: unknown {bad}; use a comma list of {','.join(REPORT_TO)} or none")

    @property
    def lora_targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]

    @property
    def trackers(self) -> list[str]:
        return [r.strip() for r in self.report_to.split(",") if r.strip() in REPORT_TO]

    def lora_target_regex(self) -> str:
        """A full-match regex over module names, restricted to the language model's decoder.

        A suffix list like ["gate_proj", …] would also hit the ViT blocks' MLPs
        (model.visual.blocks.N.mlp.gate_proj), so LoRA would silently train the vision tower.
        """
        by_parent: dict[str, list[str]] = {}
        for t in self.lora_targets:
            by_parent.setdefault(LM_LINEAR_PARENTS[t], []).append(re.escape(t))
        alts = "|".join(f"{parent}\\.(?:{'|'.join(names)})" for parent, names in sorted(by_parent.items()))
        lm = rf"(?:.*\.)?language_model\.layers\.\d+\.(?:{alts})"
        if not self.tune_vision:
            return lm
        vision = r"(?:.*\.)?visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj))"
        return f"{lm}|{vision}"

    def modules_to_save(self) -> list[str]:
        out = []
        if self.tune_merger:
            out.append("merger")
        if self.train_lm_head:
            out.append("lm_head")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


HELP = {
    "model_name_or_path": "base model folder (a Qwen2.5-VL HF folder, e.g. a `riskva tiny-model` output)",
    "dataset_path": "prepared JSONL or Parquet folder (train/val/test) or a single split file",
    "output_dir": "run folder: checkpoints/, runs/ (TensorBoard), adapter/ (the result)",
    "per_device_train_batch_size": "samples per micro-batch on each rank",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "num_train_epochs": "passes over the training split (ignored when --max_steps > 0)",
    "max_steps": "optimizer steps to run; overrides --num_train_epochs when > 0",
    "learning_rate": "peak learning rate (AdamW)",
    "merger_lr": "peak learning rate of the vision-language merger (default: --learning_rate); "
                 "ms-swift's --aligner_lr",
    "lr_scheduler": "learning-rate decay after warmup: cosine (to 10%% of peak), linear (to 0) or constant",
    "warmup_ratio": "fraction of the steps spent warming the learning rate up linearly from 0",
    "weight_decay": "AdamW weight decay on matrices (biases and norms are never decayed)",
    "max_grad_norm": "gradient clipping norm (0 disables); fills DeepSpeed's gradient_clipping",
    "bf16": "bfloat16 mixed precision (GPU); fills DeepSpeed's bf16.enabled",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "use_lora": "LoRA adapters (true) or full fine-tuning of the language model (false)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_target_modules": "comma list of language-model projections to adapt; the vision tower is never "
                           "targeted unless --tune_vision",
    "tune_vision": "also train the vision transformer (LoRA on its attention/MLP linears)",
    "tune_merger": "fully train the vision-language merger (saved with the adapter as modules_to_save)",
    "train_lm_head": "fully train lm_head (modules_to_save); needed when the base is random, as in the demo",
    "min_pixels": "minimum pixels per image after resizing; saved into the output processor",
    "max_pixels": "maximum pixels per image after resizing (one image token per 28x28 px); saved into the "
                  "output processor so evaluation and serving resize identically",
    "max_length": "samples with more tokens are dropped (counted in the log), never truncated",
    "cache_images": "decode every image into memory once before training",
    "augment_flip": "flip training images horizontally and vertically (p=0.5 each, fixed per seed, epoch "
                    "and sample); labels must not depend on orientation",
    "dataloader_num_workers": "DataLoader worker processes for decoding + tokenising",
    "logging_steps": "log loss/lr/throughput every N optimizer steps",
    "eval_steps": "compute validation loss every N steps (0: only at the end, if a val split exists)",
    "save_steps": "write a resumable checkpoint every N steps (0: only on SIGTERM/SIGINT)",
    "save_total_limit": "keep this many newest checkpoints",
    "resume_from_checkpoint": "'auto' (newest checkpoint in output_dir, if any) or a checkpoint folder",
    "report_to": "comma list of tensorboard,mlflow or none; mlflow needs MLFLOW_TRACKING_URI",
    "prompt_config": "PromptTemplate JSON: rebuild conversations from the fields with this prompt",
    "seed": "seed for weights init of adapters, data order and dropout (recorded in training_args.json)",
}


def build_parser(prog: str = "riskva train", description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = f"--{f.name}"
        default = defaults[f.name]
        help_ = HELP[f.name]
        if f.name in ("model_name_or_path", "dataset_path", "output_dir"):
            p.add_argument(flag, required=True, help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=default,
                           help=f"{help_} (default {default}; bare flag = true)")
        else:
            # the declared type, not the default's: `float | None` (--merger_lr) parses as float
            declared = (hints[f.name], *typing.get_args(hints[f.name]))
            kind = next((t for t in (int, float) if t in declared), str)
            p.add_argument(flag, type=kind, default=default, help=f"{help_} (default {default})")
    p.add_argument("--recipe", default=None,
                   help="start from a named recipe (train/recipes.py): auto (from the base model), demo, lora "
                   "(the 7B LoRA default, lr 1e-4) or seed (the seed's exact values); flags given also win")
    return p


def config_from_args(argv: list[str] | None, description: str | None = None) -> TrainConfig:
    import sys

    parser = build_parser(description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.recipe:  # the recipe's flags first, so every flag given on the command line overrides them
        from riskva_core.train.recipes import resolve

        try:
            _, recipe_argv = resolve(args.recipe, args.model_name_or_path)
        except ValueError as exc:
            raise RiskvaError(f"--recipe: {exc}") from None
        args = parser.parse_args(recipe_argv + argv)
    del args.recipe
    return TrainConfig(**vars(args))
