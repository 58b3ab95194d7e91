"""Loss-only logits against full logits on one batch: the loss and the LoRA gradients must be what
plain Trainer computes over full-sequence logits (tests/train/test_step_compute.py on the tiny model,
tests/model/test_real_width.py at the 7B's 3584 x 152064 head)."""
from __future__ import annotations

import torch

from riskva_core.data.samples import read_samples
from riskva_core.model.loading import load_model, load_processor
from riskva_core.train.collate import IGNORE_INDEX, Collator, SFTDataset
from riskva_core.train.config import TrainableArguments
from riskva_core.train.sft import RiskvaTrainer
from riskva_core.train.trainable import apply_trainable, trainable_parameters


def supervised_batch(data, model_dir, n: int = 3) -> dict:
    processor = load_processor(model_dir, min_pixels=28 * 28, max_pixels=56 * 56)
    ds = SFTDataset(read_samples(data, "train"), processor, max_length=4096)
    # Different lengths: the right padding (labels -100) is part of what must not count.
    return Collator(pad_id=processor.tokenizer.pad_token_id)([ds[i] for i in range(n)])


def lora_trainer(model_dir, tmp_path, dtype: str = "float32") -> RiskvaTrainer:
    from transformers import TrainingArguments

    model = load_model(model_dir, dtype=dtype, device="cpu")
    model.config.use_cache = False
    model = apply_trainable(model, TrainableArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0), seed=0)
    for name, p in trainable_parameters(model).items():  # LoRA B starts at 0: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no")
    return RiskvaTrainer(model=model, args=args)


def _loss_and_grads(trainer: RiskvaTrainer, batch: dict, loss_only: bool, num_items=None):
    trainer.loss_only_logits = loss_only
    head_rows: list[int] = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    trainer.model.zero_grad()
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in trainable_parameters(trainer.model).items()}
    return loss.detach(), grads, head_rows


def assert_loss_only_matches_full(trainer, batch, rtol: float, atol: float) -> None:
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert supervised < batch["labels"].numel() // 2  # most positions are prompt/image/padding
    for num_items in (None, torch.tensor(supervised + 7)):  # plain mean, and Trainer's accumulation count
        full, g_full, rows_full = _loss_and_grads(trainer, batch, False, num_items)
        kept, g_kept, rows_kept = _loss_and_grads(trainer, batch, True, num_items)
        assert rows_full == [batch["input_ids"].numel()] and rows_kept == [supervised]
        torch.testing.assert_close(kept, full, rtol=rtol, atol=atol)
        assert g_kept.keys() == g_full.keys() and g_full
        for name in g_full:
            torch.testing.assert_close(g_kept[name], g_full[name], rtol=rtol, atol=atol, msg=name)
