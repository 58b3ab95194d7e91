"""Full fine-tuning with --bf16 outside DeepSpeed keeps fp32 master weights; pure bf16 is refused.

One process, the tiny model, two optimizer steps through riskva_core.train's own ``train``.
"""
from __future__ import annotations

import pytest
import torch

from model_fixtures import make_prepared_dataset, make_tiny_model
from riskva_core.errors import RiskvaError
from riskva_core.train.config import config_from_args
from riskva_core.train.sft import train

WEIGHT = "model.layers.0.mlp.down_proj.weight"  # the checkpoint's own (legacy) key names


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    data = make_prepared_dataset(root / "data", 6, image_size=56)
    return root, data, make_tiny_model(root / "model", data)


def _args(model, data, out, *flags):
    return ["--model_name_or_path", str(model), "--dataset_path", str(data), "--output_dir", str(out),
            "--recipe", "none", "--use_lora", "False", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--max_steps", "2", "--warmup_ratio", "0",
            "--lr_scheduler_type", "constant", "--save_strategy", "no", "--eval_strategy", "no",
            "--report_to", "none", "--min_pixels", "784", "--max_pixels", "3136", "--seed", "0", *flags]


def test_full_fine_tuning_keeps_updates_that_bf16_weights_would_round_away(env, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    root, data, model = env
    out = root / "full"
    # Adam's first steps move each weight by ~lr: 2 x 2e-6 stays below half of bf16's spacing (|w| / 256)
    # for all but the smallest weights (|w| ~ 0.014 here).
    cpu = [] if torch.cuda.is_available() else ["--use_cpu"]  # upstream: --bf16 without a GPU needs it
    result = train(config_from_args(_args(model, data, out, "--bf16", *cpu, "--learning_rate", "2e-6")))
    assert result["step"] == 2
    assert "trainable bf16 tensors in float32" in capsys.readouterr().err
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        start = f.get_tensor(WEIGHT).to(torch.bfloat16)  # what --bf16 loaded and training started from
    final = load_file(str(out / "model" / "model.safetensors"))[WEIGHT]
    assert final.dtype == torch.float32  # the master copy, saved as trained
    delta = final - start.float()
    moved = delta != 0
    assert moved.float().mean() > 0.5
    # The same update applied to the bf16 weights themselves (even at once, not step by step) would be lost.
    kept_in_bf16 = (start.float() + delta).to(torch.bfloat16) != start
    assert kept_in_bf16[moved].float().mean() < 0.2


def test_pure_bf16_full_fine_tuning_is_refused_with_the_reason(env):
    root, data, model = env
    cfg = config_from_args(_args(model, data, root / "pure", "--torch_dtype", "bfloat16"))
    with pytest.raises(RiskvaError, match=r"trainable weights are torch.bfloat16 with no fp32 master copy .*"
                                          r"updates below 1/256 of a weight would round away; add --bf16"):
        train(cfg)
