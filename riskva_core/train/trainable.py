"""What a run trains: the LoRA/full-tuning switch, AdamW groups and parameter bookkeeping.

Training, checkpoints and the tests all ask ``apply_trainable``/``trainable_parameters``, so the
set of trainable weights is defined once; ``param_groups`` gives the merger its own rate.
"""
from __future__ import annotations

import hashlib
from typing import Any

from riskva_core.train.config import TrainConfig


def apply_trainable(model, cfg: TrainConfig):
    """Freeze the base and make trainable exactly what the config asks for; returns the model."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_regex(),
            modules_to_save=cfg.modules_to_save() or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(cfg.seed)  # LoRA A init is random: fixed per seed
        model = get_peft_model(model, lora)
    else:
        inner = model.model
        for p in inner.language_model.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
        if cfg.tune_merger:
            for p in inner.visual.merger.parameters():
                p.requires_grad_(True)
        if cfg.tune_vision:
            for p in inner.visual.parameters():
                p.requires_grad_(True)
    return model


def param_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, biases/norms don't; the merger may run at its own --merger_lr.

    ``lr_scale`` multiplies the scheduled learning rate, so warmup and decay shape every group
    alike. A separate projector rate is the usual VLM knob (LLaVA's mm_projector_lr, ms-swift's
    aligner_lr): the merger is trained from scratch while LoRA only nudges the language model.
    """
    merger_scale = (cfg.merger_lr / cfg.learning_rate) if cfg.merger_lr else 1.0
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in trainable_parameters(model).items():
        buckets.setdefault((".visual.merger." in f".{name}", p.ndim >= 2), []).append(p)
    groups = []
    for (merger, decay), ps in sorted(buckets.items()):
        groups.append({"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                       "lr_scale": merger_scale if merger else 1.0})
    return groups


def trainable_parameters(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def params_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(trainable_parameters(model).items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
