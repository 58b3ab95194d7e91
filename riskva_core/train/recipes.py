"""Named training recipes: flag sets for ``riskva train`` that callers (CLI docs, Dagster) default to.

DEMO_CPU   the `small` random-weight tiny Qwen2.5-VL on the synthetic dataset, on 2 CPU cores.
           A random base has a frozen random lm_head, so LoRA alone plateaus near loss 4: the
           recipe also trains lm_head and the vision-language merger fully (modules_to_save).
           The merger learns at 5x the LoRA rate (ms-swift's aligner_lr), images are capped at
           48 image tokens (a 4:3 photo becomes 224x168 px), and random flips give each of the
           10 epochs new views.
SEED_GPU   the seed project's launch line for Qwen2.5-VL-7B-Instruct (README.zh.md), with the
           pixel cap of common LoRA recipes made explicit so that eval/serving resize the same.

    from riskva_core.train.recipes import DEMO_CPU, to_argv
    train(config_from_args(to_argv(DEMO_CPU, model_name_or_path=..., dataset_path=..., output_dir=...)))
"""
from __future__ import annotations

from typing import Any

# How this recipe was found (every run, and what did not help): docs/recipes.md.
DEMO_CPU: dict[str, Any] = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 10,
    "learning_rate": 2e-3,
    "merger_lr": 1e-2,
    "augment_flip": True,
    "lr_scheduler_type": "cosine_with_min_lr",  # the old loop's cosine: decays to 10 % of the peak
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "use_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "train_lm_head": True,
    "tune_merger": True,
    "tune_vision": False,
    "min_pixels": 56 * 56,
    "max_pixels": 48 * 28 * 28,  # ≤ 48 image tokens: 512×384 → 224×168 px, 48 tokens
    "max_length": 1024,
    "logging_steps": 20,
    "save_steps": 200,
    "seed": 0,
}
# Model size for `riskva tiny-model` that DEMO_CPU was tuned with.
DEMO_CPU_MODEL_SIZE = "small"

SEED_GPU: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "num_train_epochs": 3,
    "learning_rate": 5e-6,
    "bf16": True,
    "gradient_checkpointing": True,
    "use_lora": True,
    "lora_r": 64,
    "lora_alpha": 128,
    "lora_dropout": 0.05,
    "lora_target_modules": "q_proj,v_proj,k_proj,o_proj,gate_proj,up_proj,down_proj",
    "min_pixels": 256 * 28 * 28,
    "max_pixels": 1280 * 28 * 28,
    "max_length": 4096,
    "save_steps": 500,
    "seed": 42,
}

RECIPES = {"demo": DEMO_CPU, "seed": SEED_GPU}


def resolve(name: str) -> tuple[str, list[str]]:
    """(recipe name, train argv); 'auto' is the seed recipe with a CUDA GPU, the demo one otherwise."""
    if name == "auto":
        import torch

        name = "seed" if torch.cuda.is_available() else "demo"
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; expected auto, {', '.join(RECIPES)}")
    return name, to_argv(RECIPES[name])


def to_argv(recipe: dict[str, Any], **overrides: Any) -> list[str]:
    """The recipe (plus overrides such as paths) as ``riskva train`` argv."""
    flags = {**recipe, **overrides}
    argv: list[str] = []
    for key, value in flags.items():
        if value is None:
            continue
        argv += [f"--{key}", str(value)]
    return argv
