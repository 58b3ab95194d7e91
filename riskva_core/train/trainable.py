"""What a run trains: the LoRA/full-tuning switch and the optimizer's groups.

Training, the optimizer and the tests all ask ``apply_trainable``/``trainable_parameters``, so
the set of trainable weights is defined once; ``param_groups`` gives the merger its own rate.
"""
from __future__ import annotations

import contextlib
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


def trainable_state_dict(model, keep: bool = True) -> dict[str, Any]:
    """Host copies of the trainable weights only, for an adapter save.

    Upstream's DeepSpeed save (``accelerator.get_state_dict``) clones the whole model's state
    dict to host memory on every rank, ZeRO-2 included, to keep a few LoRA keys: ~16 GB per rank
    for the 7B, ~135 GB on an 8-GPU node. This copies just the trainable tensors. Under ZeRO-3
    their partitions are gathered first (``GatheredParameters``, a collective: every rank calls;
    only the ranks with ``keep`` copy). Values are the engine's working weights, as upstream saves.
    """
    params = trainable_parameters(model)
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        return {n: p.detach().to("cpu", copy=True) for n, p in params.items()} if keep else {}
