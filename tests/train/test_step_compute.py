"""Per-step compute: loss-only logits (the LM head runs only at supervised positions, and the loss
and its gradients are what plain Trainer computes over full-sequence logits: tiny model and the
7B's real width, 152064-row head) and length-grouped batches from the lengths the dataset knows."""
from __future__ import annotations

import os

import pytest
import torch

from model_fixtures import make_prepared_dataset, make_tiny_model
from riskva_core.data.samples import read_samples
from riskva_core.model.loading import load_model, load_processor
from riskva_core.train.collate import IGNORE_INDEX, Collator, SFTDataset
from riskva_core.train.config import TrainableArguments
from riskva_core.train.sft import RiskvaTrainer
from riskva_core.train.trainable import apply_trainable, trainable_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _batch(data, model_dir, n: int = 3) -> dict:
    processor = load_processor(model_dir, min_pixels=28 * 28, max_pixels=56 * 56)
    ds = SFTDataset(read_samples(data, "train"), processor, max_length=4096)
    # Different lengths: the right padding (labels -100) is part of what must not count.
    return Collator(pad_id=processor.tokenizer.pad_token_id)([ds[i] for i in range(n)])


def _trainer(model_dir, tmp_path, dtype: str = "float32") -> RiskvaTrainer:
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


def _assert_same(trainer, batch, rtol: float, atol: float) -> None:
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    data = make_prepared_dataset(root / "data", 12)
    return data, make_tiny_model(root / "model", data)


def test_loss_only_logits_match_full_logits_on_the_tiny_model(tiny, tmp_path):
    data, model_dir = tiny
    _assert_same(_trainer(model_dir, tmp_path), _batch(data, model_dir), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_loss_only_logits_match_full_logits_at_the_7b_real_width(tmp_path):
    """The real 3584 x 152064 head, in float32 so the comparison is not bf16 noise."""
    data = make_prepared_dataset(tmp_path / "data", 8, image_size=56)
    model_dir = make_tiny_model(tmp_path / "model", data, size="real-width")
    _assert_same(_trainer(model_dir, tmp_path, dtype="float32"), _batch(data, model_dir, n=2), rtol=1e-4, atol=1e-5)


def test_length_grouped_samplers_use_the_known_lengths_without_encoding(tiny, tmp_path):
    from transformers import TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    data, model_dir = tiny
    processor = load_processor(model_dir, min_pixels=28 * 28, max_pixels=56 * 56)

    class Counted(SFTDataset):
        encoded = 0

        def __getitem__(self, idx):
            Counted.encoded += 1
            return super().__getitem__(idx)

    ds = Counted(read_samples(data, "train"), processor, max_length=4096)
    ds.lengths = [len(ds.lengths) * 10 - 10 * i for i in range(len(ds))]  # distinct, descending
    model = load_model(model_dir, device="cpu")
    for strategy in ("group_by_length", "batch_rebalance", "random"):
        args = TrainingArguments(output_dir=str(tmp_path / strategy), use_cpu=True, report_to="none",
                                 per_device_train_batch_size=2, train_sampling_strategy=strategy)
        trainer = RiskvaTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
        sampler = trainer._get_train_sampler()
        order = [i for b in sampler for i in (b if isinstance(b, list) else [b])]  # batch_rebalance: batches
        assert sorted(order) == list(range(len(ds)))
        if strategy == "group_by_length":
            assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == ds.lengths
            assert next(iter(sampler)) == 0  # the longest sample comes first (upstream's OOM-early rule)
            assert sorted(trainer._get_eval_sampler(ds)) == list(range(len(ds)))
    assert Counted.encoded == 0


def test_liger_flag_is_refused_in_one_line_where_it_cannot_run(tiny, tmp_path, monkeypatch):
    """Upstream's --use_liger_kernel: GPU-only Triton kernels, not installed on this machine."""
    from transformers.utils import import_utils

    from riskva_core.errors import RiskvaError
    from riskva_core.train.config import config_from_args
    from riskva_core.train.sft import train

    data, model_dir = tiny
    argv = ["--model_name_or_path", str(model_dir), "--dataset_path", str(data), "--output_dir", str(tmp_path),
            "--use_liger_kernel", "True"]
    with pytest.raises(RiskvaError, match="liger-kernel package"):
        train(config_from_args(argv))
    monkeypatch.setattr(import_utils, "is_liger_kernel_available", lambda: True)  # installed, but no GPU here
    with pytest.raises(RiskvaError, match="needs a CUDA GPU"):
        train(config_from_args(argv))
