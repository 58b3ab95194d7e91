"""fp32 master weights for whatever trains at full size outside DeepSpeed.

With ``--bf16`` the model loads in bf16 (half the memory). LoRA's own weights stay fp32 (peft's
``autocast_adapter_dtype``), and DeepSpeed's bf16 optimizer keeps an fp32 master copy of every
trainable partition, but full fine-tuning (``--use_lora False``) and ``modules_to_save`` (the
merger, lm_head) under plain Trainer would update the bf16 weights in place: an update smaller
than 1/256 of a weight rounds away, so most of a small learning rate's steps do nothing.
As LLaMA-Factory does, those trainable tensors are upcast to fp32 while the frozen ones stay bf16;
``--bf16``'s autocast runs the matmuls in bf16 either way. Without autocast (``--torch_dtype
bfloat16`` alone) fp32 weights would meet bf16 activations, so that combination is refused.
"""
from __future__ import annotations

from transformers import TrainingArguments

from riskva_core.errors import RiskvaError


def keep_fp32_master(model, args: TrainingArguments) -> int:
    """Upcast trainable low-precision tensors to fp32 where nothing else keeps a master copy.

    Returns how many tensors were upcast (0 under DeepSpeed, or when every trainable tensor
    is already fp32). Raises for pure-bf16 training (no ``--bf16`` autocast, no DeepSpeed).
    """
    import torch

    low = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not low or args.deepspeed_plugin is not None:  # DeepSpeed: fp32 master partitions in its optimizer
        return 0
    if not args.bf16:
        raise RiskvaError(
            f"{sum(p.numel() for p in low):,} trainable weights are {low[0].dtype} with no fp32 master copy "
            "(--torch_dtype bfloat16 without --bf16): updates below 1/256 of a weight would round away; "
            "add --bf16 (mixed precision, trainable weights kept in fp32) or train under DeepSpeed")
    for p in low:
        p.data = p.data.float()
    return len(low)
