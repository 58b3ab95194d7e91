"""Training flag presets for ``lora_adapter``: the demo recipe (CPU) and the seed recipe (GPU).

A preset is a list of riskva_core.train flags; Launchpad overrides are appended after
it, and argparse keeps the last value, so any field can be changed per run.
"""
from __future__ import annotations

# Learns the synthetic task with the `small` random-weight demo model on 2 CPU cores in
# minutes: a high learning rate, lm_head and merger trained (the base is random), few pixels.
DEMO_CPU: list[str] = [
    "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "1",
    "--max_steps", "60",
    "--learning_rate", "2e-3",
    "--lr_scheduler", "cosine",
    "--warmup_ratio", "0.05",
    "--lora_r", "16",
    "--lora_alpha", "32",
    "--lora_dropout", "0.0",
    "--train_lm_head", "true",
    "--tune_merger", "true",
    "--max_pixels", str(112 * 112),
    "--min_pixels", str(56 * 56),
    "--logging_steps", "5",
    "--save_steps", "0",
    "--report_to", "none",
    "--seed", "42",
]

# The seed project's launch line (Qwen2.5-VL-7B-Instruct, 8 GPUs, ZeRO-2).
SEED_GPU: list[str] = [
    "--per_device_train_batch_size", "2",
    "--gradient_accumulation_steps", "8",
    "--num_train_epochs", "3",
    "--learning_rate", "5e-6",
    "--bf16", "true",
    "--gradient_checkpointing", "true",
    "--use_lora", "true",
    "--save_steps", "500",
    "--report_to", "tensorboard",
    "--seed", "42",
]

RECIPES: dict[str, list[str]] = {"demo": DEMO_CPU, "seed": SEED_GPU}


def resolve(name: str) -> tuple[str, list[str]]:
    """('demo'|'seed', flags); 'auto' is seed with a CUDA GPU, demo otherwise."""
    if name == "auto":
        import torch

        name = "seed" if torch.cuda.is_available() else "demo"
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; expected auto, {', '.join(RECIPES)}")
    return name, list(RECIPES[name])
