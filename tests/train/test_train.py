"""Training through the real entry points: accelerate launch + DeepSpeed ZeRO-2 on CPU ranks (gloo).

Nothing is mocked: the tiny Qwen2.5-VL trains for a few steps on tiny images. The first
DeepSpeed run on a machine JIT-builds DeepSpeed's CPU shm-comm op (cached afterwards).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port
from model_fixtures import make_prepared_dataset, make_tiny_model
from rank_callbacks import params_digest, paused_marker, rank_env
from riskva_core.data.samples import read_samples
from riskva_core.errors import RiskvaError
from riskva_core.train.config import TrainableArguments, build_parser, config_from_args
from riskva_core.train.sft import train
from riskva_core.train.trainable import apply_trainable

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PY = Path(sys.executable)
ACCELERATE = PY.parent / "accelerate"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_prepared_dataset(root / "data", 15)
    model = make_tiny_model(root / "model", data)
    return root, data, model


def _args(model: Path, data: Path, out: Path, **over) -> list[str]:
    flags = {
        "model_name_or_path": model, "dataset_path": data, "output_dir": out,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "max_steps": 6,
        "learning_rate": 3e-3, "warmup_ratio": 0.0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "logging_steps": 1, "save_steps": 2, "train_lm_head": True, "tune_merger": True,
        "min_pixels": 28 * 28, "max_pixels": 56 * 56, "seed": 3, "report_to": "tensorboard",
    }
    flags.update(over)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})  # rank_env's PYTHONPATH keeps the repository
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _launch(num_processes: int, args: list[str], **extra) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs/deepspeed_zero2.yaml"),
            "--num_processes", str(num_processes), "--main_process_port", str(free_port()),
            "-m", "riskva_core.train", *args]


def _run(cmd: list[str], **extra) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=_env(**extra), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def zero2_run(env):
    root, data, model = env
    out = root / "zero2"
    p = _run(_launch(1, _args(model, data, out)), **rank_env(digest=True))
    return out, p


def test_zero2_single_process_trains_saves_and_reloads(env, zero2_run):
    from riskva_core.model.loading import load_model

    root, data, model = env
    out, p = zero2_run
    assert "DeepSpeed ZeRO-2" in p.stderr
    metrics = json.loads((out / "adapter" / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert metrics["final"]["step"] == 6 and metrics["final"]["trainable_parameters"] > 0
    assert f"trainable parameters: {metrics['final']['trainable_parameters']:,}" in p.stderr

    adapter = out / "adapter"
    tensors = _adapter_tensors(out)
    assert any("lora_A" in k for k in tensors) and any("lm_head" in k for k in tensors)
    assert any("merger" in k for k in tensors) and not any("visual.blocks" in k for k in tensors)
    cfg = json.loads((adapter / "processor_config.json").read_text())["image_processor"]
    assert cfg["size"] == {"shortest_edge": 784, "longest_edge": 3136}
    assert (cfg["min_pixels"], cfg["max_pixels"]) == (784, 3136)
    args = json.loads((adapter / "training_args.json").read_text())
    assert args["seed"] == 3 and args["pixel_budget"] == {"min_pixels": 784, "max_pixels": 3136}
    info = json.loads((data / "dataset_info.json").read_text())
    assert json.loads((adapter / "dataset.json").read_text())["fingerprint"] == info["fingerprint"]
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    # Trainer's rotation (--save_total_limit 2, the default) keeps the newest two.
    assert sorted(int(c.name.split("-")[1]) for c in out.glob("checkpoint-*")) == [4, 6]
    # Each checkpoint carries what adapter/ does besides weights, so any checkpoint-N merges and serves.
    for c in out.glob("checkpoint-*"):
        assert json.loads((c / "processor_config.json").read_text())["image_processor"]["max_pixels"] == 3136
        for f in ("image_policy.json", "prompt_template.json"):
            assert (c / f).read_text() == (adapter / f).read_text()
    # A checkpoint merges with default flags (judged by its outputs) and hands the policy on.
    from riskva_core.model.merge import MergeConfig, merge

    merged = root / "merged-checkpoint-4"
    report = merge(MergeConfig(base_model_path=model, adapter_path=out / "checkpoint-4", output_dir=merged))
    assert report["adapter_path"] == str(out / "checkpoint-4") and report["equivalent"]
    assert (merged / "image_policy.json").read_text() == (adapter / "image_policy.json").read_text()
    assert json.loads((merged / "processor_config.json").read_text())["image_processor"]["max_pixels"] == 3136
    assert "eval_loss" in metrics["final"]  # the val split is evaluated at the end

    # Reloading the saved adapter gives back exactly the trained parameters.
    reloaded = load_model(model, adapter_path=adapter, trainable_adapter=True)
    debug = json.loads((out / "debug" / "rank0.json").read_text())
    assert params_digest(reloaded) == debug["digest"]


def test_zero2_two_ranks_stay_in_sync(env):
    root, data, model = env
    out = root / "zero2x2"
    p = _run(_launch(2, _args(model, data, out, max_steps=3, save_strategy="no", merger_lr=1e-2, augment_flip=True)),
             **rank_env(digest=True))
    ranks = [json.loads((out / "debug" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert "world size 2" in p.stderr
    assert json.loads((out / "adapter" / "metrics.json").read_text())["final"]["world_size"] == 2


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path.name}: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def test_sigkill_mid_run_then_resume_matches_uninterrupted(env, zero2_run):
    import torch

    root, data, model = env
    ref_out, _ = zero2_run
    out = root / "killed"
    args = _args(model, data, out)
    proc = subprocess.Popen(_launch(1, args), cwd=REPO, env=_env(**rank_env(pause_after_step=3)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(paused_marker(out), proc)
        rank_pid = int(paused_marker(out).read_text().split()[1])
        os.kill(rank_pid, signal.SIGKILL)  # the training process itself: no chance to clean up
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher (the rank runs in its own session)
        proc.wait()
    assert not (out / "adapter").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists()

    p = _run(_launch(1, args + ["--resume_from_checkpoint", "auto"]))
    assert "resumed from" in p.stderr and "at step 2" in p.stderr
    got, want = _adapter_tensors(out), _adapter_tensors(ref_out)
    assert got.keys() == want.keys()
    # Same batches, RNG and optimizer state: equal up to float round-off (documented in sft.py).
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert diff < 1e-5, diff
    assert any(float(want[k].abs().max()) > 0 for k in want if "lora_B" in k)
    del torch


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(env):
    root, data, model = env
    out = root / "sigterm"
    args = _args(model, data, out, max_steps=3, save_strategy="no", report_to="none")
    proc = subprocess.Popen([str(PY), "-m", "riskva_core.train", *args], cwd=REPO,
                            env=_env(**rank_env(pause_after_step=1)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(paused_marker(out), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested" in err
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    assert not (out / "adapter").exists()

    # Resume in-process (the Dagster path): a callback sees the remaining steps' logs.
    from transformers import TrainerCallback

    class Rec(TrainerCallback):
        def __init__(self):
            self.steps, self.began_at = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.began_at = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.steps.append(state.global_step)

    rec = Rec()
    cfg = config_from_args(args + ["--resume_from_checkpoint", "auto"])
    result = train(cfg, callbacks=[rec])
    assert result["step"] == 3 and rec.began_at == 1 and rec.steps == [2, 3]
    assert result["world_size"] == 1 and result["adapter_dir"] == str(out / "adapter")
    args_json = json.loads((out / "adapter" / "training_args.json").read_text())
    assert args_json["pixel_budget"]["max_pixels"] == 3136 and args_json["resume_from_checkpoint"] == "auto"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _trainable(**over) -> TrainableArguments:
    return TrainableArguments(**{"lora_r": 4, "lora_alpha": 8, **over})


def test_lora_targets_only_the_language_model_and_counts_parameters(env):
    from transformers.trainer_pt_utils import get_model_param_count

    from riskva_core.model.loading import load_model

    _, data, model_dir = env
    base = load_model(model_dir)
    model = apply_trainable(load_model(model_dir), _trainable(), seed=0)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and not [n for n in lora_names if "visual" in n]
    trainable = get_model_param_count(model, trainable_only=True)
    tc = base.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    dims = {"q_proj": (tc.hidden_size, tc.num_attention_heads * head_dim),
            "k_proj": (tc.hidden_size, tc.num_key_value_heads * head_dim),
            "v_proj": (tc.hidden_size, tc.num_key_value_heads * head_dim),
            "o_proj": (tc.num_attention_heads * head_dim, tc.hidden_size),
            "gate_proj": (tc.hidden_size, tc.intermediate_size), "up_proj": (tc.hidden_size, tc.intermediate_size),
            "down_proj": (tc.intermediate_size, tc.hidden_size)}
    expected = tc.num_hidden_layers * sum(4 * (i + o) for i, o in dims.values())
    assert trainable == expected
    # all-linear (PEFT's spelling) means every language-model projection, still never the ViT's MLPs.
    all_linear = apply_trainable(load_model(model_dir), _trainable(lora_target_modules="all-linear"), seed=0)
    assert get_model_param_count(all_linear, trainable_only=True) == expected
    assert not [n for n, _ in all_linear.named_parameters() if "lora_" in n and "visual" in n]

    with_heads = apply_trainable(load_model(model_dir), _trainable(tune_merger=True, train_lm_head=True), seed=0)
    merger = sum(p.numel() for p in base.model.visual.merger.parameters())
    assert get_model_param_count(with_heads, trainable_only=True) == expected + merger + base.lm_head.weight.numel()

    names3 = [n for n, _ in apply_trainable(load_model(model_dir), _trainable(tune_vision=True), seed=0)
              .named_parameters() if "lora_" in n]
    assert any("visual.blocks" in n for n in names3)


def test_merger_lr_is_its_own_group_and_follows_the_schedule(env, tmp_path):
    """The optimizer Trainer steps: merger groups at --merger_lr, scaled by the same schedule."""
    from riskva_core.model.loading import load_model
    from riskva_core.train.sft import RiskvaTrainer

    _, data, model_dir = env
    cfg = config_from_args(_args(model_dir, data, tmp_path, merger_lr=1e-2, weight_decay=0.1, warmup_ratio=0.25,
                                 max_steps=8, report_to="none"))
    model = apply_trainable(load_model(model_dir), cfg.trainable, seed=0)
    trainer = RiskvaTrainer(model=model, args=cfg.args, merger_lr=cfg.trainable.merger_lr)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = trainer.optimizer.param_groups
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    kinds = []
    for g in groups:
        merger = {".visual.merger." in f".{names[id(p)]}" for p in g["params"]}
        assert len(merger) == 1  # a group never mixes merger and other weights
        kinds.append(merger.pop())
        assert g["weight_decay"] in (0.0, 0.1)
        assert not any(("bias" in names[id(p)] or "norm" in names[id(p)]) for p in g["params"]) or g["weight_decay"] == 0
    assert set(kinds) == {True, False}
    ratio = 1e-2 / cfg.args.learning_rate
    for _ in range(6):  # warmup, then cosine decay: the ratio stays the same at every step
        lrs = {k: {g["lr"] for g, m in zip(groups, kinds) if m == k} for k in (True, False)}
        (merger_lr,), (lm_lr,) = lrs[True], lrs[False]
        assert merger_lr == pytest.approx(ratio * lm_lr)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert 0 < lm_lr < cfg.args.learning_rate  # it did follow the schedule
    default = RiskvaTrainer(model=model, args=cfg.args)  # no --merger_lr: upstream's optimizer as is
    assert len({g["lr"] for g in default.create_optimizer().param_groups}) == 1


def test_flags_help_and_validation(env):
    import torch

    _, data, model = env
    text = build_parser().format_help()
    # Ours, the seed's, and upstream's TrainingArguments flags, with the older spellings kept.
    for flag in ("--use_lora", "--lora_target_modules", "--merger_lr", "--torch_dtype", "--dtype",
                 "--attn_implementation", "--deepspeed", "--eval_strategy", "--load_best_model_at_end",
                 "--early_stopping_patience", "--lr_scheduler_type", "--lr_scheduler", "--warmup_ratio",
                 "--optim", "--report_to", "--resume_from_checkpoint"):
        assert flag in text, flag
    base = ["--model_name_or_path", str(model), "--dataset_path", str(data), "--output_dir", "o"]
    assert config_from_args(base + ["--use_lora", "False"]).trainable.use_lora is False
    cpu = [] if torch.cuda.is_available() else ["--use_cpu"]  # upstream: --bf16 without a GPU needs it
    cfg = config_from_args(base + ["--use_lora", "True", "--bf16", "--dtype", "bfloat16", *cpu])
    assert cfg.args.bf16 is True and cfg.model.torch_dtype == "bfloat16"
    # The old loop's cosine: decays to 10 % of the peak.
    assert cfg.args.lr_scheduler_type == "cosine_with_min_lr" and cfg.args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert config_from_args(base + ["--warmup_ratio", "0.1"]).args.warmup_steps == 0.1
    assert config_from_args(base + ["--lr_scheduler", "linear"]).args.lr_scheduler_type == "linear"
    assert config_from_args(base + ["--report_to", "tensorboard", "mlflow"]).args.report_to == ["tensorboard", "mlflow"]
    with pytest.raises(RiskvaError, match="one integration per word"):
        config_from_args(base + ["--report_to", "tensorboard,mlflow"])
    with pytest.raises(RiskvaError, match="add --eval_strategy steps"):
        config_from_args(base + ["--eval_steps", "5"])
    with pytest.raises(RiskvaError, match="lora_target_modules"):
        config_from_args(base + ["--lora_target_modules", "q_proj,qkv"])
    with pytest.raises(RiskvaError, match="min_pixels"):
        config_from_args(base + ["--min_pixels", "5000", "--max_pixels", "4000"])
    with pytest.raises(RiskvaError, match="torch_dtype"):
        config_from_args(base + ["--torch_dtype", "int3"])
    with pytest.raises(RiskvaError, match="early_stopping_patience"):
        config_from_args(base + ["--early_stopping_patience", "2"])
    assert config_from_args(base + ["--merger_lr", "1e-2", "--tune_merger"]).trainable.merger_lr == 1e-2
    with pytest.raises(RiskvaError, match="merger_lr"):
        config_from_args(base + ["--merger_lr", "0"])
    with pytest.raises(RiskvaError, match="--merger_lr needs --tune_merger"):
        config_from_args(base + ["--merger_lr", "1e-2", "--tune_merger", "False"])


def test_early_stopping_and_best_checkpoint(env):
    """--early_stopping_patience through Trainer's EarlyStoppingCallback; the adapter is the best step's.

    With --greater_is_better True on a falling eval_loss, the first evaluation stays the best, so
    patience 1 stops at the second one and the best checkpoint is step 1.
    """
    root, data, model = env
    out = root / "early"
    args = _args(model, data, out, max_steps=6, save_steps=1, eval_strategy="steps", eval_steps=1, report_to="none",
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                 early_stopping_patience=1, lora_dropout=0.0)
    result = train(config_from_args(args))
    assert result["step"] == 2 and result["best_model_checkpoint"] == str(out / "checkpoint-1")
    evals = [h["eval_loss"] for h in json.loads((out / "adapter" / "metrics.json").read_text())["history"]
             if "eval_loss" in h]
    assert evals[1] < evals[0] and result["eval_loss"] == pytest.approx(evals[0])  # the kept weights are step 1's


def test_final_eval_runs_after_the_adapter_is_written_at_the_training_batch(env):
    """An out-of-memory final evaluation can no longer lose the run: the adapter is on disk first,
    and the batch is the training one (Trainer's default 8 only if asked for)."""
    from transformers import TrainerCallback

    root, data, model = env
    out = root / "final_eval"

    class Probe(TrainerCallback):
        seen: list = []

        def on_prediction_step(self, args, state, control, **kwargs):
            self.seen.append(("batch", (out / "adapter" / "adapter_model.safetensors").is_file()))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.seen.append(("eval", (out / "adapter" / "adapter_model.safetensors").is_file()))

    n_val = len(read_samples(data, "val"))
    result = train(config_from_args(_args(model, data, out, max_steps=1, per_device_train_batch_size=2,
                                          report_to="none", save_strategy="no")), callbacks=[Probe()])
    assert Probe.seen == [("batch", True)] * -(-n_val // 2) + [("eval", True)]
    final = json.loads((out / "adapter" / "metrics.json").read_text())["final"]
    assert final["eval_loss"] == result["eval_loss"] > 0  # metrics.json updated after the evaluation
    base = ["--model_name_or_path", str(model), "--dataset_path", str(data), "--output_dir", "o"]
    assert config_from_args(base + ["--per_device_train_batch_size", "3"]).args.per_device_eval_batch_size == 3
    assert config_from_args(base + ["--per_device_eval_batch_size", "8"]).args.per_device_eval_batch_size == 8
