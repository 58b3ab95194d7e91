"""What a run trains: the LoRA/full-tuning switch, the optimizer's groups, a digest for tests.

Training, the optimizer and the tests all ask ``apply_trainable``/``trainable_parameters``, so
the set of trainable weights is defined once; ``param_groups`` gives the merger its own rate.
"""
from __future__ import annotations

import hashlib
from typing import Any

from riskva_core.train.config import TrainableArguments


def apply_trainable(model, cfg: TrainableArguments, seed: int):
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
        torch.manual_seed(seed)  # LoRA A init is random: fixed per seed
        return get_peft_model(model, lora)
    inner = model.model
    chosen = [inner.language_model, model.lm_head]
    chosen += [inner.visual.merger] if cfg.tune_merger else []
    chosen += [inner.visual] if cfg.tune_vision else []
    for module in chosen:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def param_groups(model, decay_names: set[str], weight_decay: float, lr: float,
                 merger_lr: float | None) -> list[dict[str, Any]]:
    """Optimizer groups: Trainer's decay rule (no decay on biases/norms) x merger or not.

    Each group carries its own peak ``lr``; the scheduler (a LambdaLR) multiplies every group's
    initial rate by the same factor, so warmup and decay shape the merger's rate too. A separate
    projector rate is the usual VLM knob (LLaVA's mm_projector_lr, ms-swift's aligner_lr): the
    merger is trained from scratch while LoRA only nudges the language model.
    """
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in trainable_parameters(model).items():
        buckets.setdefault((".visual.merger." in f".{name}", name in decay_names), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
             "lr": merger_lr if (merger and merger_lr) else lr}
            for (merger, decay), ps in sorted(buckets.items())]


def trainable_parameters(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def params_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(trainable_parameters(model).items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
