"""LoRA supervised fine-tuning of Qwen2.5-VL on a prepared RisKVA dataset, on ``transformers.Trainer``.

Trainer owns the loop: schedule, gradient accumulation with the loss normalised over the
tokens of all micro-batches and ranks, DeepSpeed (from ``--deepspeed ds.json`` or the accelerate
config), evaluation, checkpoints with every rank's RNG, rotation, best-model selection, logging.
RisKVA adds only what Trainer cannot know: the collator (train/collate.py: assistant-only
labels, pixel budget), what is trainable (train/trainable.py: LoRA on the language model only,
the merger's own learning rate through ``create_optimizer``), the SIGTERM and augmentation
callbacks (train/checkpoint.py) and the ``adapter/`` layout (train/outputs.py).

Single process (CPU or one GPU, no DeepSpeed):

    riskva train --model_name_or_path MODEL --dataset_path DATA --output_dir OUT
    python -m riskva_core.train --model_name_or_path MODEL --dataset_path DATA --output_dir OUT

Multi-GPU with DeepSpeed ZeRO-2 (the seed's launch line; one rank per visible GPU; the recipe,
``--recipe auto``, comes from the base model: the 7B LoRA recipe, lr 1e-4, for the 7B):

    accelerate launch --config_file configs/deepspeed_zero2.yaml \\
        --num_processes "$(python -c 'import torch; print(torch.cuda.device_count())')" \\
        -m riskva_core.train --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \\
        --dataset_path DATA --output_dir OUT --per_device_train_batch_size 2 \\
        --gradient_accumulation_steps 8 --num_train_epochs 3 \\
        --bf16 --gradient_checkpointing --use_lora True
    torchrun --nproc_per_node 8 -m riskva_core.train --deepspeed configs/ds_zero3.json ...

CPU ranks with DeepSpeed (gloo; what the tests run):

    DS_ACCELERATOR=cpu accelerate launch --config_file configs/deepspeed_zero2.yaml \\
        --num_processes 2 -m riskva_core.train --model_name_or_path MODEL ...

Output (rank 0 writes, atomically): OUT/adapter/ (layout in riskva_core/train/outputs.py),
OUT/checkpoint-STEP/ (Trainer's; resume with --resume_from_checkpoint auto|PATH), OUT/runs/
(TensorBoard). After SIGKILL + resume the adapter matches an uninterrupted run to float round-off.
SIGTERM/SIGINT on any rank: every rank saves a checkpoint at the same step and exits 0.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
from transformers import Trainer

from riskva_core.errors import RiskvaError
from riskva_core.data.samples import detect_format, read_samples
from riskva_core.train.checkpoint import CheckpointExtras, EpochForAugment, StopOnSignal, resolve_resume
from riskva_core.train.collate import IGNORE_INDEX
from riskva_core.train.config import TrainConfig, config_from_args
from riskva_core.train.ranks import init_cpu_ranks
from riskva_core.train.outputs import prompt_template, write_adapter, write_metrics, write_model_extras
from riskva_core.train.precision import keep_fp32_master
from riskva_core.train.trainable import apply_trainable, param_groups, trainable_state_dict

__all__ = ["RiskvaTrainer", "main", "train"]


class RiskvaTrainer(Trainer):
    """Trainer whose optimizer gives the vision-language merger its own peak learning rate, and
    whose loss runs the 152k-word output layer only where there is a label (``loss_only_logits``)."""

    # False gives plain Trainer's full-sequence logits (benchmarks/bench_train.py compares both).
    loss_only_logits = True

    def __init__(self, *args, merger_lr: float | None = None, **kwargs):
        self.merger_lr = merger_lr
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return super()._get_train_sampler(_length_view(dataset, self.args))

    def _get_eval_sampler(self, eval_dataset):
        return super()._get_eval_sampler(_length_view(eval_dataset, self.args))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Adapters and checkpoints under DeepSpeed save only the trainable weights.

        Upstream gathers the full state dict on every rank and PEFT then keeps the adapter keys
        (train/trainable.py: trainable_state_dict). The checkpoint's DeepSpeed engine files
        already leave frozen weights out: Trainer passes ``exclude_frozen_parameters=True`` for a
        PEFT model. Full fine-tuning saves the whole model, so it stays upstream's.
        """
        from peft import PeftModel

        if not (self.is_deepspeed_enabled and isinstance(self.model, PeftModel)):
            return super().save_model(output_dir, _internal_call)
        state = trainable_state_dict(self.model, keep=self.args.should_save)
        self._save(output_dir or self.args.output_dir, state_dict=state)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, with the LM head applied only at supervised positions.

        Position t's logits predict label t+1, so the kept positions are where the shifted labels
        are not -100: the prompt and ~1000 image tokens of a sample never reach the 3584 x 152064
        head (about 1.3 GB of float32 logits + gradient per sample at the 7B). The model's own
        loss path does the rest through two upstream forward arguments: ``logits_to_keep`` (a
        boolean mask → the head sees only those hidden states) and ``shift_labels`` (the labels
        already aligned with them). Same cross-entropy terms, same ``num_items_in_batch``
        normalisation (Trainer counts it on the unshifted batch before this), same masking.
        Not with Liger (its fused loss never materialises logits anyway) or a label smoother
        (it reads full-shape logits).
        """
        labels = inputs.get("labels")
        if (self.loss_only_logits and labels is not None and not self.args.use_liger_kernel
                and self.label_smoother is None and self.compute_loss_func is None):
            shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            keep = shifted != IGNORE_INDEX
            inputs = {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.merger_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # --optim, --adam_* as upstream
        groups = param_groups(opt_model, set(self.get_decay_parameter_names(opt_model)),
                              self.args.weight_decay, self.args.learning_rate, self.merger_lr)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer


class _Lengths:
    """What upstream's length-grouped samplers read from a dataset, without encoding a sample.

    ``--train_sampling_strategy group_by_length|batch_rebalance`` takes lengths from a Hugging
    Face ``datasets`` column or else encodes every sample once (every image) to measure it; an
    SFTDataset already knows each sample's token count (computed from the image header)."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, idx: int) -> dict[str, range]:
        return {"input_ids": range(self.lengths[idx])}


def _length_view(dataset, args):
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance") and hasattr(dataset, "lengths"):
        return _Lengths(dataset.lengths)  # the sampler yields indices; the DataLoader reads `dataset`
    return dataset


def _check_liger() -> None:
    """``--use_liger_kernel`` (upstream's flag) patches in Liger's Triton kernels: GPU only."""
    from transformers.utils import import_utils

    if not import_utils.is_liger_kernel_available():
        raise RiskvaError("--use_liger_kernel needs the liger-kernel package (pip install liger-kernel; GPU only)")
    if not torch.cuda.is_available():
        raise RiskvaError("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton); leave it off on CPU")


def _set_threads() -> None:
    """CPU ranks share the cores: without this each would start one thread per core."""
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _datasets(cfg: TrainConfig, processor, template, log):
    from riskva_core.train.collate import SFTDataset

    data, seed = cfg.data, cfg.args.seed
    # lazy_images: each rank and worker reads a Parquet image when its sample is drawn, instead
    # of holding every image's bytes (JSONL samples always read their image file on demand).
    train_ds = SFTDataset(read_samples(data.dataset_path, "train", lazy_images=True), processor, data.max_length,
                          template, cache_images=data.cache_images, flip_seed=seed if data.augment_flip else None)
    if train_ds.dropped:
        log(f"dropped {len(train_ds.dropped)} training samples longer than --max_length {data.max_length} "
            f"(longest {max(n for _, n in train_ds.dropped)} tokens)")
    if len(train_ds) == 0:
        raise RiskvaError(f"{data.dataset_path}: no training samples fit --max_length {data.max_length}")
    val_ds = None
    if data.dataset_path.is_dir():
        try:
            val_ds = SFTDataset(read_samples(data.dataset_path, "val", lazy_images=True), processor,
                                data.max_length, template)
        except RiskvaError:
            val_ds = None
    return train_ds, (val_ds if val_ds is not None and len(val_ds) else None)


def train(cfg: TrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run the training described by ``cfg``; returns the final metrics (on every rank).

    ``callbacks`` are extra ``TrainerCallback``s (the Dagster Pipes reporter). A run stopped by
    SIGTERM returns ``{"interrupted": True, "step": N}`` after its checkpoint.
    """
    from transformers import EarlyStoppingCallback
    from transformers.trainer_pt_utils import get_model_param_count
    from transformers.trainer_utils import set_seed

    from riskva_core.model.loading import load_model, load_processor
    from riskva_core.train.collate import Collator

    args = cfg.args
    main = args.process_index == 0
    if args.use_liger_kernel:
        _check_liger()

    def log(msg: str) -> None:
        if main:
            print(f"[riskva train] {msg}", file=sys.stderr, flush=True)

    _set_threads()
    set_seed(args.seed)
    processor = load_processor(cfg.model.model_name_or_path, cfg.data.min_pixels, cfg.data.max_pixels)
    template, template_dict = prompt_template(cfg.data)
    train_ds, val_ds = _datasets(cfg, processor, template, log)
    log(f"{detect_format(cfg.data.dataset_path)} dataset: {len(train_ds)} train samples, "
        f"{len(val_ds) if val_ds else 0} val")

    # --bf16 loads the weights in bf16 (half the host memory; the trainable LoRA weights stay fp32
    # in peft); otherwise the loading policy: bf16 on a bf16-capable GPU, float32 on CPU.
    dtype = cfg.model.torch_dtype or ("bfloat16" if args.bf16 else "auto")
    model = load_model(cfg.model.model_name_or_path, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                       device="cpu" if args.use_cpu else None)
    model.config.use_cache = False
    model = apply_trainable(model, cfg.trainable, args.seed)
    if upcast := keep_fp32_master(model, args):
        log(f"kept {upcast} trainable bf16 tensors in float32 (master weights; --bf16 autocasts the compute)")
    # ds_numel-aware: under ZeRO-3 partitioned weights count in full, not as 0.
    n_trainable, n_total = get_model_param_count(model, trainable_only=True), get_model_param_count(model)
    held = sum(p.numel() for p in model.parameters())  # ZeRO-3: this rank's placeholders are empty
    log(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.2f}%); "
        f"held whole on this rank: {held:,}")

    stop = StopOnSignal()
    extras = CheckpointExtras(lambda folder: write_model_extras(folder, processor, cfg.data.dataset_path, template_dict))
    extra = [stop, EpochForAugment(train_ds), extras, *(callbacks or [])]
    if args.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    trainer = RiskvaTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                            data_collator=Collator(pad_id=processor.tokenizer.pad_token_id), callbacks=extra,
                            merger_lr=cfg.trainable.merger_lr)
    ds = trainer.accelerator.state.deepspeed_plugin
    log(f"world size {args.world_size} ({f'DeepSpeed ZeRO-{ds.zero_stage}' if ds else trainer.accelerator.distributed_type}), "
        f"device {args.device}")

    resume = resolve_resume(args.resume_from_checkpoint, cfg.output_dir)
    if resume is not None:
        from transformers import TrainerState

        log(f"resumed from {resume} at step {TrainerState.load_from_json(str(resume / 'trainer_state.json')).global_step}")
    elif args.resume_from_checkpoint == "auto":
        log("no checkpoint to resume from; starting fresh")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    step = trainer.state.global_step
    if stop.stopped_at is not None:
        log(f"stop requested: saved checkpoint-{step} at step {step}; resume with --resume_from_checkpoint auto")
        return {"interrupted": True, "step": step}

    final: dict[str, Any] = {"step": step, "total_steps": trainer.state.max_steps, **result.metrics}
    final.update({
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "train_samples": len(train_ds),
        "dropped_over_max_length": len(train_ds.dropped),
        "world_size": args.world_size,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
    })
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    if tokens and result.metrics.get("train_runtime"):
        final.setdefault("train_tokens_per_second", round(tokens / result.metrics["train_runtime"], 3))
    target = write_adapter(cfg, trainer, processor, template_dict, final)  # every rank: ZeRO-3 gathers
    final["adapter_dir"] = str(target)
    log(f"wrote {target}")
    if val_ds is not None:
        # After the adapter is safe on disk: running out of memory here loses an eval, not the run.
        # The kept (best or last) weights, at --per_device_eval_batch_size (default: the training
        # batch); Trainer gives every rank even shards.
        log(f"final evaluation of {len(val_ds)} samples, batch {args.per_device_eval_batch_size} per device")
        final.update(trainer.evaluate())
        log(f"final eval loss {final['eval_loss']:.4f}")
        if main:
            write_metrics(target, trainer, final)
        trainer.accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    init_cpu_ranks(argv)
    cfg = config_from_args(argv, description=__doc__)
    result = train(cfg)
    return 0 if result.get("step") else 1
