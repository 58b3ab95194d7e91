"""Per-step compute: loss-only logits (the LM head runs only at supervised positions, and the loss
and its gradients are what plain Trainer computes over full-sequence logits: the tiny model here,
the 7B's 152064-row head in tests/model/test_real_width.py) and length-grouped batches from the lengths the dataset knows."""
from __future__ import annotations

import os

import pytest

from loss_only import assert_loss_only_matches_full, lora_trainer, supervised_batch
from model_fixtures import make_prepared_dataset, make_tiny_model
from riskva_core.data.samples import read_samples
from riskva_core.model.loading import load_model, load_processor
from riskva_core.train.collate import SFTDataset
from riskva_core.train.sft import RiskvaTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    data = make_prepared_dataset(root / "data", 12)
    return data, make_tiny_model(root / "model", data)


def test_loss_only_logits_match_full_logits_on_the_tiny_model(tiny, tmp_path):
    data, model_dir = tiny
    assert_loss_only_matches_full(lora_trainer(model_dir, tmp_path), supervised_batch(data, model_dir),
                                  rtol=1e-5, atol=1e-6)


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
