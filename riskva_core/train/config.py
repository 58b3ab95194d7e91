"""Training flags: ``transformers.TrainingArguments`` plus three small dataclasses of our own.

``HfArgumentParser`` reads them together (as the official Qwen2.5-VL finetune does), so every
Hugging Face training flag works as upstream documents it (``--deepspeed ds.json``,
``--eval_strategy``, ``--report_to tensorboard mlflow``, ``--optim`` …) and the seed's own flags
(``--use_lora True``, ``--lora_r 64``, ``--min_pixels`` …) keep their names. Booleans take the
bare form (``--bf16``) or a value (``--use_lora False``).

Defaults that differ from upstream are the seed's: batch 2 x 8 accumulation, lr 5e-6, 3 epochs,
a cosine schedule that decays to 10 % of the peak (``cosine_with_min_lr``, min_lr_rate 0.1),
3 % warmup, TensorBoard under OUT/runs, two checkpoints kept, seed 42, input tokens counted
(``non_padding``). They are defaults only: a value given on the command line means what it means
upstream. Spellings that meant something else here are refused with the upstream spelling
(``--save_steps 0`` alone, ``--eval_steps N`` alone, ``--report_to a,b``).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from riskva_core.errors import RiskvaError
# init_cpu_ranks is re-exported: the entry points import it from here, beside config_from_args.
from riskva_core.train.ranks import (check_rank_count, cpu_ranks_configured, has_gpu, init_cpu_ranks,  # noqa: F401
                                     refuse_data_parallel)

LORA_TARGETS_DEFAULT = "q_proj,v_proj,k_proj,o_proj,gate_proj,up_proj,down_proj"
# Which language-model sub-module owns each projection name (Qwen2.5-VL decoder layer).
LM_LINEAR_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
MIN_PIXELS_DEFAULT = 56 * 56
MAX_PIXELS_DEFAULT = 1280 * 28 * 28
# Below this, a LoRA update stays under bf16's resolution of the weights it is merged into.
LORA_LR_FLOOR = 1e-5


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str = dataclasses.field(
        metadata={"help": "base model folder (a Qwen2.5-VL HF folder, e.g. a `riskva tiny-model` output)"})
    torch_dtype: str | None = dataclasses.field(
        default=None, metadata={"help": "weights dtype when loading: auto, bfloat16 or float32 (default: bfloat16 "
                                        "with --bf16, else auto = bf16 on a bf16-capable GPU, float32 on CPU); "
                                        "float16 is refused (Qwen2.5-VL overflows in it)", "aliases": ["--dtype"]})
    attn_implementation: str | None = dataclasses.field(
        default=None, metadata={"help": "auto, sdpa, flash_attention_2 or eager (default auto: flash_attention_2 "
                                        "when installed on a GPU and the weights are bf16, else sdpa)"})
    recipe: str = dataclasses.field(
        default="auto", metadata={"help": "start from a named recipe (train/recipes.py): auto (the default: chosen "
                                          "from the base model, lora for the 7B and any real model, demo for a "
                                          "demo `riskva tiny-model`), demo, lora (the 7B LoRA recipe, lr 1e-4), "
                                          "seed (the seed's exact values) or none (only the flags' own "
                                          "defaults); flags given on the command line win"})

    def __post_init__(self) -> None:
        from riskva_core.model.loading import ATTN_CHOICES, resolve_dtype

        if self.torch_dtype is not None:
            resolve_dtype(self.torch_dtype, "cpu")  # validates; float16 is refused with the reason
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_CHOICES:
            raise RiskvaError(f"--attn_implementation must be one of {', '.join(ATTN_CHOICES)}, "
                              f"got {self.attn_implementation!r}")


@dataclasses.dataclass
class DataArguments:
    dataset_path: Path = dataclasses.field(
        metadata={"help": "prepared JSONL or Parquet folder (train/val/test) or a single split file"})
    # None = the recipe's (or these defaults) bounded by the other flag: --max_pixels alone never
    # contradicts a minimum the user did not set.
    min_pixels: int | None = dataclasses.field(
        default=None, metadata={"help": f"minimum pixels per image after resizing (default {MIN_PIXELS_DEFAULT}, "
                                        "at most --max_pixels); saved into the output processor"})
    max_pixels: int | None = dataclasses.field(
        default=None,
        metadata={"help": f"maximum pixels per image after resizing (one image token per 28x28 px; default "
                          f"{MAX_PIXELS_DEFAULT}, at least --min_pixels); saved into the output processor so "
                          "evaluation and serving resize identically"})
    max_length: int = dataclasses.field(
        default=2048, metadata={"help": "samples with more tokens are dropped (counted in the log), never truncated"})
    prompt_config: Path | None = dataclasses.field(
        default=None, metadata={"help": "PromptTemplate JSON: rebuild conversations from the fields with this prompt"})
    cache_images: bool = dataclasses.field(
        default=False, metadata={"help": "decode every image into memory once before training"})
    augment_flip: bool = dataclasses.field(
        default=False, metadata={"help": "flip training images horizontally and vertically (p=0.5 each, fixed per "
                                         "seed, epoch and sample); labels must not depend on orientation"})

    def __post_init__(self) -> None:
        self.dataset_path = Path(self.dataset_path)
        if self.prompt_config is not None:
            self.prompt_config = Path(self.prompt_config)
        if self.max_pixels is None:
            self.max_pixels = max(MAX_PIXELS_DEFAULT, self.min_pixels or 0)
        if self.min_pixels is None:
            self.min_pixels = min(MIN_PIXELS_DEFAULT, self.max_pixels)
        for name in ("min_pixels", "max_pixels", "max_length"):
            if getattr(self, name) <= 0:
                raise RiskvaError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise RiskvaError(f"--min_pixels {self.min_pixels} exceeds --max_pixels {self.max_pixels}")


@dataclasses.dataclass
class TrainableArguments:
    use_lora: bool = dataclasses.field(
        default=True, metadata={"help": "LoRA adapters (true) or full fine-tuning of the language model (false)"})
    lora_r: int = dataclasses.field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = dataclasses.field(default=128, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = dataclasses.field(
        default=LORA_TARGETS_DEFAULT,
        metadata={"help": "comma list of language-model projections to adapt, or all-linear (every one of them); "
                          "the vision tower is never targeted unless --tune_vision"})
    tune_vision: bool = dataclasses.field(
        default=False, metadata={"help": "also train the vision transformer (LoRA on its attention/MLP linears)"})
    tune_merger: bool = dataclasses.field(
        default=False, metadata={"help": "fully train the vision-language merger (saved as modules_to_save)"})
    train_lm_head: bool = dataclasses.field(
        default=False, metadata={"help": "fully train lm_head (modules_to_save); needed when the base is random"})
    merger_lr: float | None = dataclasses.field(
        default=None, metadata={"help": "peak learning rate of the merger (default: --learning_rate); it follows "
                                        "the same schedule; ms-swift's --aligner_lr"})

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise RiskvaError(f"--{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise RiskvaError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.merger_lr is not None and not self.merger_lr > 0:
            raise RiskvaError(f"--merger_lr must be positive, got {self.merger_lr}")
        if self.merger_lr is not None and not self.tune_merger:
            raise RiskvaError("--merger_lr needs --tune_merger: the merger is frozen otherwise")
        unknown = [t for t in self.lora_targets if t not in LM_LINEAR_PARENTS]
        if unknown or not self.lora_targets:
            raise RiskvaError(f"--lora_target_modules: {unknown or 'empty'} not language-model projections; "
                              f"choose from {','.join(LM_LINEAR_PARENTS)} or all-linear")

    @property
    def lora_targets(self) -> list[str]:
        if self.lora_target_modules.strip() == "all-linear":
            return list(LM_LINEAR_PARENTS)
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]

    def lora_target_regex(self) -> str:
        """A full-match regex over module names, restricted to the language model's decoder.

        A suffix list like ["gate_proj", …] (or PEFT's own "all-linear") would also hit the ViT
        blocks' MLPs (model.visual.blocks.N.mlp.gate_proj): LoRA would silently train the vision tower.
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
        return [name for name, on in (("merger", self.tune_merger), ("lm_head", self.train_lm_head)) if on]


def _seed_default(name: str, default: Any) -> Any:
    """Upstream's field ``name`` (help included) with the seed's default; --help names both defaults."""
    up = next(f for f in dataclasses.fields(TrainingArguments) if f.name == name)
    help_ = f"{up.metadata.get('help', '').rstrip('. ')}. RisKVA's default, the seed's (upstream: {up.default!r})"
    return dataclasses.field(default=default, metadata={**up.metadata, "help": help_})


@dataclasses.dataclass
class RiskvaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the seed's defaults and two flags upstream lacks."""

    output_dir: str = dataclasses.field(
        default=None, metadata={"help": "run folder: checkpoint-N/, runs/ (TensorBoard), adapter/ (the result)"})
    per_device_train_batch_size: int = _seed_default("per_device_train_batch_size", 2)
    per_device_eval_batch_size: int | None = dataclasses.field(
        default=None, metadata={"help": "evaluation batch per device (default: --per_device_train_batch_size; "
                                        "Trainer's 8 can run out of memory at the end of a 7B run)"})
    gradient_accumulation_steps: int = _seed_default("gradient_accumulation_steps", 8)
    num_train_epochs: float = _seed_default("num_train_epochs", 3.0)
    learning_rate: float = _seed_default("learning_rate", 5e-6)
    lr_scheduler_type: str = dataclasses.field(
        default="cosine_with_min_lr",
        metadata={"help": "learning-rate schedule after warmup (transformers' SchedulerType names; "
                          "cosine_with_min_lr decays to --lr_scheduler_kwargs min_lr_rate, default 0.1)",
                  "aliases": ["--lr_scheduler"]})
    warmup_steps: float = _seed_default("warmup_steps", 0.03)
    logging_steps: float = _seed_default("logging_steps", 10)
    save_total_limit: int | None = _seed_default("save_total_limit", 2)
    # A list (one integration per word), as TrainingArguments itself takes it: upstream's CLI type is a
    # single string, so `--report_to tensorboard mlflow` could not be written at all.
    report_to: list[str] | None = dataclasses.field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "integrations to report to, one per word (--report_to tensorboard mlflow), or all, or "
                          "none (default: tensorboard, under OUT/runs; upstream's is none)"})
    # None = unset (a string default would go through the flag's boolean parser): non_padding.
    include_num_input_tokens_seen: str | bool = dataclasses.field(
        default=None,
        metadata={"help": "count input tokens: True (all), False (no); unset: non_padding, RisKVA's default "
                          "(upstream's is no), so every run reports training tokens/s, image tokens included"})
    remove_unused_columns: bool = False  # the collator needs pixel_values/image_grid_thw as they are
    label_names: list[str] | None = dataclasses.field(default_factory=lambda: ["labels"])  # PeftModel hides them
    warmup_ratio: float | None = dataclasses.field(
        default=None, metadata={"help": "fraction of the steps spent warming up (transformers < 5 name; sets "
                                        "--warmup_steps to the ratio)"})
    early_stopping_patience: int | None = dataclasses.field(
        default=None, metadata={"help": "stop after this many evaluations without improving --metric_for_best_model "
                                        "(EarlyStoppingCallback; needs --load_best_model_at_end)"})

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise RiskvaError("--output_dir is required")
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise RiskvaError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to or []
        if any("," in r for r in reports):
            # Upstream would take "a,b" as one integration's name and fail when Trainer starts.
            raise RiskvaError(f"--report_to {','.join(reports)}: one integration per word, e.g. "
                              f"--report_to {' '.join(r.strip() for x in reports for r in x.split(',') if r.strip())}")
        if self.lr_scheduler_type == "cosine_with_min_lr" and not self.lr_scheduler_kwargs:
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}  # the seed recipe's floor: 10 % of the peak
        if self.accelerator_config is None and cpu_ranks_configured():
            self.accelerator_config = {"use_configured_state": True}  # keep the gloo group set up below
        if self.gradient_checkpointing_kwargs is None and self.activation_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DeepSpeed ZeRO-3.
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        if self.include_num_input_tokens_seen is None:
            self.include_num_input_tokens_seen = "non_padding"
        if self.fp16:
            from riskva_core.model.loading import FP16_REFUSED

            raise RiskvaError(f"--fp16 {FP16_REFUSED}; use --bf16")
        refuse_data_parallel(self)
        check_rank_count(self)
        if self.early_stopping_patience is not None and (self.early_stopping_patience <= 0
                                                          or not self.load_best_model_at_end):
            raise RiskvaError("--early_stopping_patience needs a positive value and --load_best_model_at_end True")
        try:
            super().__post_init__()
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            if "support bf16" in first:  # upstream names the field, not the flag
                first = f"--bf16: {first.split('.')[0]}; add --use_cpu for bf16 autocast on the CPU, or --bf16 False"
            raise RiskvaError(first) from None


@dataclasses.dataclass
class TrainConfig:
    """The four parsed argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    trainable: TrainableArguments
    args: RiskvaTrainingArguments

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def to_dict(self) -> dict[str, Any]:
        """Every flag's value, JSON-safe: the run's record in adapter/training_args.json."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.trainable):
            out.update({k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(part).items()})
        hf = json.loads(self.args.to_json_string())
        out.update({k: v for k, v in hf.items() if k not in out})
        return out


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainableArguments, RiskvaTrainingArguments))
    parser.prog = "riskva train"
    return parser


def explicit_flags(argv: list[str]) -> dict[str, Any]:
    """The flags ``argv`` itself sets (aliases, ``--flag=value`` and bare booleans included), parsed.

    A recipe supplies every other value; this tells the two apart without guessing at spellings:
    the same parser runs with every default replaced by a marker.
    """
    import argparse

    if "-h" in argv or "--help" in argv:
        return {}  # the real parse prints the help (with its description)
    parser = build_parser()
    unset = object()
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.default is not argparse.SUPPRESS})
    namespace, _ = parser.parse_known_args(argv)
    return {k: v for k, v in vars(namespace).items() if v is not unset}


def fit_recipe(name: str, recipe: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's flags, adjusted so that none contradicts a flag the user gave.

    A pixel bound the user set moves the recipe's other bound out of its way (``--recipe lora
    --max_pixels 50176`` lowers the recipe's 200704 minimum to 50176); an explicit ``--tune_merger
    False`` drops the recipe's merger rate; full fine-tuning (``--use_lora False``) of a model whose
    recipe is LoRA's takes the seed's full fine-tuning rate, not LoRA's 1e-4.
    """
    flags = dict(recipe)
    if "max_pixels" in given and "min_pixels" not in given and flags.get("min_pixels") is not None:
        flags["min_pixels"] = min(int(flags["min_pixels"]), given["max_pixels"])
    if "min_pixels" in given and "max_pixels" not in given and flags.get("max_pixels") is not None:
        flags["max_pixels"] = max(int(flags["max_pixels"]), given["min_pixels"])
    if given.get("tune_merger") is False:
        flags.pop("merger_lr", None)
    if name == "lora" and given.get("use_lora") is False:
        from riskva_core.train.recipes import SEED_GPU

        flags["learning_rate"] = SEED_GPU["learning_rate"]
    return flags


def refuse_old_meanings(given: dict[str, Any]) -> None:
    """Spellings that meant something else in RisKVA: a one-line error with the upstream spelling.

    Upstream ignores --eval_steps without --eval_strategy steps, and --save_steps 0 saves only at
    the end; here they used to turn evaluation on and saving off. A run relying on that would
    silently differ, so without the strategy flag next to them they are refused."""
    if given.get("eval_steps") and "eval_strategy" not in given:
        raise RiskvaError(f"--eval_steps {given['eval_steps']:g} alone does not turn evaluation on (upstream): "
                          f"add --eval_strategy steps")
    if given.get("save_steps") == 0 and "save_strategy" not in given:
        raise RiskvaError("--save_steps 0 does not mean 'never save' (upstream saves at the end): "
                          "use --save_strategy no")


def warn_low_lora_lr(cfg: TrainConfig) -> str | None:
    """One warning line (rank 0 prints it) for LoRA at a full fine-tuning rate; the run goes on."""
    import os

    lr = cfg.args.learning_rate
    if not cfg.trainable.use_lora or lr >= LORA_LR_FLOOR:
        return None
    msg = (f"warning: LoRA at --learning_rate {lr:g} (below {LORA_LR_FLOOR:g}, a full fine-tuning rate such as "
           f"the seed's 5e-6): the LoRA update stays below bfloat16's resolution of the weights it is merged "
           f"into and rounds away in a bf16 merge; LoRA is run at 1e-4 (--recipe lora, the default for a "
           f"real model: drop --learning_rate)")
    if os.environ.get("RANK", "0") == "0":
        print(f"[riskva train] {msg}", file=sys.stderr, flush=True)
    return msg


def config_from_args(argv: list[str] | None, description: str | None = None) -> TrainConfig:
    """Parse ``argv`` over the recipe (``--recipe``, default auto: from the base model).

    The recipe's flags go first, so every flag given on the command line overrides them.
    Unknown flags are an error, as before; bad values raise RiskvaError.
    """
    from riskva_core.train.recipes import recipe_flags, to_argv

    parser = build_parser()
    if description:
        parser.description = description
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        given = explicit_flags(argv)
        refuse_old_meanings(given)
        try:
            name, recipe = recipe_flags(given.get("recipe", "auto"), given.get("model_name_or_path"))
        except ValueError as exc:
            raise RiskvaError(f"--recipe: {exc}") from None
        flags = fit_recipe(name, recipe, given)
        if flags.get("bf16") and not {"bf16", "use_cpu"} & given.keys() and not has_gpu():
            # The recipe's bf16 on a host without a GPU: bf16 autocast on the CPU, which upstream allows
            # only with use_cpu. A --bf16 the user gave is left to upstream (refused without --use_cpu).
            flags["use_cpu"] = True
        recipe_argv = to_argv(flags)
        model, data, trainable, args = parser.parse_args_into_dataclasses(args=recipe_argv + argv)
    except ValueError as exc:  # upstream validation in TrainingArguments/peft-style checks
        raise RiskvaError(str(exc).splitlines()[0]) from None
    model.recipe = name  # the record says which recipe "auto" became
    cfg = TrainConfig(model, data, trainable, args)
    warn_low_lora_lr(cfg)
    return cfg
