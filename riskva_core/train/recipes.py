"""Named training recipes: flag sets for ``riskva train`` that callers (CLI docs, Dagster) default to.

DEMO_CPU   the `small` random-weight tiny Qwen2.5-VL on the synthetic dataset, on 2 CPU cores.
           A random base has a frozen random lm_head, so LoRA alone plateaus near loss 4: the
           recipe also trains lm_head and the vision-language merger fully (modules_to_save).
           The merger learns at 5x the LoRA rate (ms-swift's aligner_lr), images are capped at
           48 image tokens (a 4:3 photo becomes 224x168 px), and random flips give each of the
           12 epochs new views (on transformers.Trainer; 10 were enough for the old loop).
LORA_7B    the default for Qwen2.5-VL-7B-Instruct (and any model that is not a demo model): the
           seed's launch line (README.zh.md) with the learning rate that LoRA is run at by
           LLaMA-Factory and ms-swift (1e-4). The seed's 5e-6 is a full fine-tuning rate; at that
           rate a LoRA update of a few thousand steps stays below bf16's resolution of the weights
           it is merged into (model/merge.py then refuses it).
SEED_GPU   the seed's exact values (``--recipe seed``), for reproducing the seed project.
           Its (and LORA_7B's) bf16 on a host without a GPU is bf16 autocast on the CPU: the recipe's
           default then comes with ``--use_cpu``, which upstream requires (train/config.py).
none       no recipe: only the flags' own defaults (``--recipe none``).

Every entry point applies ``--recipe auto`` unless told otherwise (``python -m riskva_core.train``,
``accelerate launch -m riskva_core.train``, ``riskva train``, riskva_assets/pipes_rank.py, the
Dagster asset); flags given on the command line always win (train/config.py ``config_from_args``).

``resolve("auto", base_model)`` picks by the BASE MODEL, never by the devices of whoever asks:
a folder written by ``riskva tiny-model`` with a demo size (its ``tiny_model_info.json`` says
``"recipe": "demo"``) gets DEMO_CPU; everything else (a hub id, a real checkpoint, the
7B-shaped stand-ins) gets LORA_7B. So a GPU host does not put the 7B recipe on the tiny
model, and a GPU-less orchestrator does not put the demo recipe on the 7B.

    from riskva_core.train.recipes import DEMO_CPU, to_argv
    train(config_from_args(to_argv(DEMO_CPU, model_name_or_path=..., dataset_path=..., output_dir=...)))
"""
from __future__ import annotations

from typing import Any

# How this recipe was found (every run, and what did not help): docs/recipes.md.
DEMO_CPU: dict[str, Any] = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 12,
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

# LLaMA-Factory's examples/train_lora/qwen2_5vl_lora_sft.yaml and ms-swift's LoRA default: lr 1e-4.
LORA_7B: dict[str, Any] = {**SEED_GPU, "learning_rate": 1e-4}

# "none": only the flags' own defaults (the seed's full fine-tuning values), nothing underneath.
RECIPES = {"demo": DEMO_CPU, "lora": LORA_7B, "seed": SEED_GPU, "none": {}}
MODEL_INFO = "tiny_model_info.json"  # written by `riskva tiny-model`; names the recipe its size was built for


def recipe_for_model(base_model: str | None) -> str:
    """'demo' for a demo-size `riskva tiny-model` folder, 'lora' for anything else.

    Read from the folder only (no hub access): a hub id or an MLflow URI is a real model.
    """
    import json
    from pathlib import Path

    if not base_model:
        return "demo"  # no base given: the Dagster graph builds the demo model
    info = Path(str(base_model)).expanduser() / MODEL_INFO
    if info.is_file():
        try:
            return "demo" if json.loads(info.read_text(encoding="utf-8")).get("recipe", "demo") == "demo" else "lora"
        except (OSError, json.JSONDecodeError, AttributeError):
            return "lora"
    return "lora"


def recipe_flags(name: str, base_model: str | None = None) -> tuple[str, dict[str, Any]]:
    """(recipe name, its flags); 'auto' follows the base model (:func:`recipe_for_model`)."""
    if name == "auto":
        name = recipe_for_model(base_model)
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; expected auto, {', '.join(RECIPES)}")
    return name, dict(RECIPES[name])


def resolve(name: str, base_model: str | None = None) -> tuple[str, list[str]]:
    """(recipe name, train argv); the argv names the recipe too (``--recipe NAME``), so that
    ``riskva_core.train``, which applies ``--recipe auto`` by default, puts the same one underneath."""
    name, flags = recipe_flags(name, base_model)
    return name, ["--recipe", name, *to_argv(flags)]


def to_argv(recipe: dict[str, Any], **overrides: Any) -> list[str]:
    """The recipe (plus overrides such as paths) as ``riskva train`` argv."""
    flags = {**recipe, **overrides}
    argv: list[str] = []
    for key, value in flags.items():
        if value is None:
            continue
        argv += [f"--{key}", str(value)]
    return argv
