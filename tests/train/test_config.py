"""Training flags at every entry point: the recipe chosen from the base model underneath, explicit
flags on top, pixel bounds that follow the user's, the LoRA low-rate warning, DataParallel refused.

Parsing only (no model is loaded): config_from_args is what `python -m riskva_core.train`,
`accelerate launch -m riskva_core.train`, `riskva train` and riskva_assets/pipes_rank.py all call.
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
# Upstream takes --bf16 without a bf16 GPU only with --use_cpu (bf16 autocast on the CPU).
if not torch.cuda.is_available():
    SEED_LINE.append("--use_cpu")


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
    # The asset passes the recipe's flags themselves, so its --bf16 is a given flag: upstream's rule applies.
    cfg = _cfg(demo_model, *argv, *([] if torch.cuda.is_available() else ["--use_cpu"]))
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


# Upstream flags mean what upstream says: for the same argv, the parsed TrainingArguments equal those of
# transformers' own HfArgumentParser(TrainingArguments); RisKVA changes defaults only, and refuses its
# former meanings with the upstream spelling.
def _ours_and_upstream(*argv: str):
    from transformers import HfArgumentParser, TrainingArguments

    ours = _cfg(HUB_ID, "--recipe", "none", *argv).args
    (upstream,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=["--output_dir", "o", *argv])
    return ours, upstream


def _same(fields: tuple[str, ...], *argv: str) -> None:
    ours, upstream = _ours_and_upstream(*argv)
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(upstream, f) for f in fields}, argv


def test_eval_steps_means_what_upstream_says():
    fields = ("eval_strategy", "eval_steps", "do_eval")
    for argv in (["--eval_strategy", "steps", "--eval_steps", "5"], ["--eval_strategy", "no", "--eval_steps", "5"],
                 ["--eval_strategy", "epoch", "--eval_steps", "5"], ["--eval_strategy", "steps", "--logging_steps", "3"]):
        _same(fields, *argv)
    # Alone it turned evaluation on here; upstream ignores it, so a run relying on that is refused.
    with pytest.raises(RiskvaError, match=r"^--eval_steps 5 alone does not turn evaluation on .*add --eval_strategy steps$"):
        _cfg(HUB_ID, "--eval_steps", "5")


def test_save_steps_means_what_upstream_says():
    fields = ("save_strategy", "save_steps")
    for argv in (["--save_steps", "7"], ["--save_steps", "0.25"], ["--save_strategy", "no", "--save_steps", "0"],
                 ["--save_strategy", "steps", "--save_steps", "0"], ["--save_strategy", "epoch"]):
        _same(fields, *argv)
    # "Never save" here before; upstream's save_steps 0 saves at the end only.
    with pytest.raises(RiskvaError, match=r"^--save_steps 0 does not mean 'never save' .*use --save_strategy no$"):
        _cfg(HUB_ID, "--save_steps", "0")


def test_include_num_input_tokens_seen_means_what_upstream_says():
    from riskva_core.train.config import build_parser

    for argv in (["--include_num_input_tokens_seen", "False"], ["--include_num_input_tokens_seen", "True"],
                 ["--include_num_input_tokens_seen"], ["--include_num_input_tokens_seen", "no"]):
        _same(("include_num_input_tokens_seen",), *argv)
    assert _cfg(HUB_ID, "--include_num_input_tokens_seen", "False").args.include_num_input_tokens_seen == "no"
    # Only the default differs (tokens/s in every run), and --help says so.
    assert _cfg(HUB_ID).args.include_num_input_tokens_seen == "non_padding"
    shown = " ".join(build_parser().format_help().split())
    assert "unset: non_padding, RisKVA's default (upstream's is no)" in shown
    assert "RisKVA's default, the seed's (upstream: 5e-05) (default: 5e-06)" in shown  # --learning_rate


def test_bf16_means_what_upstream_says():
    from transformers import HfArgumentParser, TrainingArguments

    _same(("bf16", "use_cpu", "mixed_precision"), "--bf16", "--use_cpu")
    _same(("bf16", "use_cpu", "mixed_precision"), "--bf16", "False")
    try:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=["--output_dir", "o", "--bf16"])
    except ValueError:  # no bf16 GPU here: upstream refuses, and so does RisKVA (it used to switch use_cpu on)
        with pytest.raises(RiskvaError, match=r"^--bf16: .*add --use_cpu"):
            _cfg(HUB_ID, "--bf16")
        # The 7B recipe's own bf16 (a default, not a flag the user gave) comes with use_cpu on such a host.
        recipe = _cfg(HUB_ID).args
        assert recipe.bf16 and recipe.use_cpu
    else:
        _same(("bf16", "use_cpu", "mixed_precision"), "--bf16")
        assert not _cfg(HUB_ID).args.use_cpu


def test_report_to_means_what_upstream_says():
    from transformers import TrainingArguments

    for argv in (["--report_to", "tensorboard"], ["--report_to", "none"], ["--report_to", "all"],
                 ["--report_to", "mlflow"]):
        _same(("report_to",), *argv)
    # Several integrations, one per word: what TrainingArguments(report_to=[...]) means (upstream's CLI type
    # is one string, so it cannot spell a list); a comma list is one unknown name upstream, refused here.
    assert _cfg(HUB_ID, "--report_to", "tensorboard", "mlflow").args.report_to == \
        TrainingArguments(output_dir="o", report_to=["tensorboard", "mlflow"]).report_to
    with pytest.raises(RiskvaError, match=r"^--report_to tensorboard,mlflow: one integration per word, "
                                          r"e.g. --report_to tensorboard mlflow$"):
        _cfg(HUB_ID, "--report_to", "tensorboard,mlflow")
    assert _cfg(HUB_ID).args.report_to == ["tensorboard"]  # RisKVA's default (upstream: none)
