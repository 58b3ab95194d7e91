"""Training flags at every entry point: the recipe chosen from the base model underneath, explicit
flags on top, pixel bounds that follow the user's, the LoRA low-rate warning, DataParallel refused.

Parsing only (no model is loaded): config_from_args is what `python -m riskva_core.train`,
`accelerate launch -m riskva_core.train`, `riskva train` and riskva_assets/pipes_train.py all call.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from riskva_core.errors import RiskvaError
from riskva_core.train.config import config_from_args
from riskva_core.train.recipes import LORA_7B, resolve

HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
# The seed's launch line (README.zh.md) without --learning_rate.
SEED_LINE = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8", "--num_train_epochs", "3",
             "--bf16", "--gradient_checkpointing", "--use_lora", "True"]


def _cfg(model: str, *flags: str):
    return config_from_args(["--model_name_or_path", model, "--dataset_path", "d", "--output_dir", "o", *flags])


@pytest.fixture
def demo_model(tmp_path):
    """A folder that says what `riskva tiny-model --size small` says about itself."""
    (tmp_path / "tiny_model_info.json").write_text(json.dumps({"size": "small", "recipe": "demo"}))
    return str(tmp_path)


def test_the_recipe_comes_from_the_base_model_and_given_flags_win(demo_model):
    seed_line = _cfg(HUB_ID, *SEED_LINE)
    assert seed_line.model.recipe == "lora" and seed_line.args.learning_rate == LORA_7B["learning_rate"] == 1e-4
    assert (seed_line.data.min_pixels, seed_line.data.max_pixels) == (LORA_7B["min_pixels"], LORA_7B["max_pixels"])
    assert _cfg(HUB_ID, "--learning_rate=2e-4", "--lora_r", "16").args.learning_rate == 2e-4
    demo = _cfg(demo_model)
    assert demo.model.recipe == "demo" and demo.trainable.train_lm_head and demo.args.learning_rate == 2e-3
    # --recipe none: the flags' own defaults, nothing underneath.
    bare = _cfg(demo_model, "--recipe", "none")
    assert bare.args.learning_rate == 5e-6 and not bare.trainable.train_lm_head
    # Full fine-tuning of the 7B takes the seed's full fine-tuning rate, not LoRA's.
    assert _cfg(HUB_ID, "--use_lora", "False").args.learning_rate == 5e-6
    # Turning the demo's merger off drops the demo's merger rate instead of contradicting it.
    assert _cfg(demo_model, "--tune_merger", "False").trainable.merger_lr is None


def test_the_dagster_asset_flags_put_the_same_recipe_underneath(demo_model):
    # The asset resolves the recipe itself; `--recipe seed` on the demo model must not get demo flags below.
    name, argv = resolve("seed", demo_model)
    cfg = _cfg(demo_model, *argv)
    assert cfg.model.recipe == "seed" and not cfg.trainable.train_lm_head and cfg.trainable.merger_lr is None


def test_pixel_bounds_follow_the_flags_the_user_gave():
    cfg = _cfg(HUB_ID, "--recipe", "lora", "--max_pixels", "50176")
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (50176, 50176)
    cfg = _cfg(HUB_ID, "--min_pixels", "2000000")
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (2000000, 2000000)
    cfg = _cfg(HUB_ID, "--recipe", "none", "--max_pixels", "2000")
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (2000, 2000)
    with pytest.raises(RiskvaError, match=r"^--min_pixels 60000 exceeds --max_pixels 50176$"):
        _cfg(HUB_ID, "--min_pixels", "60000", "--max_pixels", "50176")


def test_lora_at_a_full_fine_tuning_rate_warns_why_and_still_runs(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = _cfg(HUB_ID, *SEED_LINE, "--learning_rate", "5e-6")  # the seed's line as written
    assert cfg.args.learning_rate == 5e-6
    err = capsys.readouterr().err
    assert "LoRA at --learning_rate 5e-06" in err and "rounds away in a bf16 merge" in err
    _cfg(HUB_ID, "--use_lora", "False", "--learning_rate", "5e-6")
    _cfg(HUB_ID)
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "3")  # one line per run, from rank 0
    _cfg(HUB_ID, "--learning_rate", "5e-6")
    assert "warning" not in capsys.readouterr().err


def test_one_process_on_several_gpus_is_refused_with_the_launch_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RiskvaError, match=r"one process sees 4 GPUs .*DataParallel.*accelerate launch --config_file "
                                          r"configs/deepspeed_zero2.yaml --num_processes 4 .*CUDA_VISIBLE_DEVICES=0"):
        _cfg(HUB_ID, "--recipe", "none")
    # Training on the CPU never wraps the model (a real single GPU cannot be simulated past Trainer's set-up).
    assert _cfg(HUB_ID, "--recipe", "none", "--use_cpu").args.use_cpu


def test_more_ranks_than_gpus_is_refused_and_idle_gpus_are_named(monkeypatch, capsys):
    """The accelerate configs start 8 ranks (the seed's 8-GPU host); each rank checks that against
    the GPUs it sees before touching CUDA (simulated: 4 GPUs)."""
    from riskva_core.train.config import check_rank_count

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    args = SimpleNamespace(use_cpu=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RiskvaError, match=r"^8 ranks on this node but 4 GPU\(s\) visible: launch with --num_processes 4 "):
        check_rank_count(args)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_rank_count(args)
    assert "2 rank(s) on this node and 4 GPUs visible: 2 stay idle; --num_processes 4" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_rank_count(args)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # CPU ranks (gloo) are not GPUs
    check_rank_count(SimpleNamespace(use_cpu=True))
