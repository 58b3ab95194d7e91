"""lora_adapter's resume decision: continue only from checkpoints of the same run identity; move the
others aside; never resume a finished run."""
from __future__ import annotations

import json
from pathlib import Path

from riskva_assets.resume import (COMPLETE_FILE, IDENTITY_FILE, SUPERSEDED_DIR, config_files_digest,
                                  launcher_config_files, mark_complete, plan_resume, run_identity, with_resume)

ARGS = ["--model_name_or_path", "/m", "--dataset_path", "/d", "--output_dir", "/o", "--max_steps", "4"]
DATA = {"sft_jsonl": "aaaa", "base_model": "bbbb"}


def _checkpoint(out: Path, step: int) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def _superseded(out: Path) -> list[str]:
    return sorted(p.relative_to(out / SUPERSEDED_DIR).parts[1] for p in (out / SUPERSEDED_DIR).glob("*/*"))


def test_same_identity_resumes_and_anything_else_is_moved_aside(tmp_path: Path):
    out = tmp_path / "train"
    identity = run_identity(ARGS, DATA, "/m", code_version="c1")
    plan = plan_resume(out, identity)
    assert (plan.action, plan.why) == ("fresh", "no checkpoint yet; starting fresh")
    assert json.loads((out / IDENTITY_FILE).read_text()) == identity
    _checkpoint(out, 2)  # a cancelled or crashed attempt left a checkpoint
    # Retry / re-execution with the same data, base model and config; flags that cannot change the result
    # (where and how often it logs or saves, loader workers, the resume flag itself) keep the checkpoints.
    same = run_identity(ARGS[:-4] + ["--output_dir", "/elsewhere", "--max_steps", "4", "--logging_steps", "1",
                                     "--report_to", "tensorboard", "--save_steps=7", "--logging_first_step",
                                     "--dataloader_num_workers", "4", "--resume_from_checkpoint", "auto"],
                        DATA, "/m", code_version="c1")
    assert same == identity
    plan = plan_resume(out, same)
    assert plan.resume and "resuming" in plan.why and (out / "checkpoint-2").is_dir()
    assert with_resume(ARGS, True)[-2:] == ["--resume_from_checkpoint", "auto"]
    assert "--resume_from_checkpoint" not in with_resume(ARGS + ["--resume_from_checkpoint", "/x"], False)
    # Other data: the checkpoints are moved aside (with the identity they belong to), never resumed from.
    plan = plan_resume(out, run_identity(ARGS, {**DATA, "sft_jsonl": "cccc"}, "/m", code_version="c1"))
    assert plan.action == "fresh" and plan.why.startswith("checkpoints of other data_versions: moved them to ")
    assert not list(out.glob("checkpoint-*")) and plan.superseded.parent == out / SUPERSEDED_DIR
    assert sorted(p.name for p in plan.superseded.iterdir()) == ["checkpoint-2", IDENTITY_FILE]
    assert json.loads((plan.superseded / IDENTITY_FILE).read_text()) == identity
    # Each of: training code, launcher/DeepSpeed config, base model, rank count, a flag that matters.
    changes = {"code_version": dict(code_version="c2"), "launcher_config_sha256": dict(launcher_config_sha256="x"),
               "base_model": dict(base_model="/other"), "world_size": dict(world_size=2),
               "train_args_sha256": dict(train_args=ARGS[:-1] + ["8"])}
    for key, change in changes.items():
        assert plan_resume(out, identity).why == "no checkpoint yet; starting fresh"
        _checkpoint(out, 1)  # written by the run of `identity`
        kwargs = {"train_args": ARGS, "data_versions": DATA, "base_model": "/m", "code_version": "c1", **change}
        plan = plan_resume(out, run_identity(**kwargs))
        assert plan.action == "fresh" and f"checkpoints of other {key}: moved" in plan.why, (key, plan.why)
    assert _superseded(out).count("checkpoint-1") == len(changes)
    # Checkpoints with no recorded identity (written by hand or an older version): not trusted.
    (out / IDENTITY_FILE).unlink()
    _checkpoint(out, 3)
    plan = plan_resume(out, identity)
    assert plan.why.startswith("checkpoints without a run identity: moved them to ") and "checkpoint-3" in _superseded(out)


def test_a_finished_run_is_reused_as_it_is_or_retrained_never_resumed(tmp_path: Path):
    out = tmp_path / "train"
    identity = run_identity(ARGS, DATA, "/m", code_version="c1")
    plan_resume(out, identity)
    _checkpoint(out, 4)  # the finished run keeps checkpoint-{max_steps}
    mark_complete(out, identity, "adapterhash", 4)
    plan = plan_resume(out, identity, "adapterhash")
    assert plan.action == "reuse" and plan.completed["step"] == 4 and "nothing trained" in plan.why
    # Its adapter was replaced or removed since: the finished run's checkpoint-4 is not resumed into 0 steps.
    plan = plan_resume(out, identity, None)
    assert plan.action == "fresh" and plan.why.startswith("the finished run of this identity no longer has its adapter")
    assert not (out / COMPLETE_FILE).exists() and not list(out.glob("checkpoint-*"))
    assert sorted(p.name for p in plan.superseded.iterdir()) == ["checkpoint-4", COMPLETE_FILE, IDENTITY_FILE]
    # A code change after a finished run: step 0, the finished run's checkpoints moved aside.
    _checkpoint(out, 4)
    mark_complete(out, identity, "adapterhash", 4)
    plan = plan_resume(out, run_identity(ARGS, DATA, "/m", code_version="c2"), "adapterhash")
    assert plan.action == "fresh" and plan.why.startswith("checkpoints of other code_version: moved them")


def test_launcher_config_files_follow_the_accelerate_config_and_the_deepspeed_flag(tmp_path: Path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "ds3.json").write_text('{"zero_optimization": {"stage": 3}}')
    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n")
    files = launcher_config_files(acc, ARGS + ["--deepspeed", "ds3.json"], tmp_path)
    assert files == [acc, tmp_path / "ds.json", tmp_path / "ds3.json"]
    before = config_files_digest(files)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    assert config_files_digest(files) != before
