"""lora_adapter's resume decision: continue only from checkpoints of the same run identity."""
from __future__ import annotations

import json
from pathlib import Path

from riskva_assets.resume import IDENTITY_FILE, plan_resume, run_identity, with_resume

ARGS = ["--model_name_or_path", "/m", "--dataset_path", "/d", "--output_dir", "/o", "--max_steps", "4"]
DATA = {"sft_jsonl": "aaaa", "base_model": "bbbb"}


def _checkpoint(out: Path, step: int) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_same_identity_resumes_and_anything_else_starts_fresh(tmp_path: Path):
    out = tmp_path / "train"
    identity = run_identity(ARGS, DATA, "/m")
    assert plan_resume(out, identity) == (False, "no checkpoint yet; starting fresh")
    assert json.loads((out / IDENTITY_FILE).read_text()) == identity
    _checkpoint(out, 2)  # a cancelled or crashed attempt left a checkpoint
    # Retry / re-execution with the same data, base model and config (output dir and resume flag aside).
    same = run_identity(ARGS[:-4] + ["--output_dir", "/elsewhere", "--max_steps", "4",
                                     "--resume_from_checkpoint", "auto"], DATA, "/m")
    assert same == identity
    resume, why = plan_resume(out, same)
    assert resume and "resuming" in why and (out / "checkpoint-2").is_dir()
    assert with_resume(ARGS, resume)[-2:] == ["--resume_from_checkpoint", "auto"]
    assert "--resume_from_checkpoint" not in with_resume(ARGS + ["--resume_from_checkpoint", "/x"], False)
    # Other data: the checkpoints are cleared, never resumed from.
    resume, why = plan_resume(out, run_identity(ARGS, {**DATA, "sft_jsonl": "cccc"}, "/m"))
    assert not resume and why == "checkpoints of other data_versions: cleared them; starting fresh"
    assert not list(out.glob("checkpoint-*"))
    # Another config (more steps) or base model: same.
    _checkpoint(out, 1)
    resume, why = plan_resume(out, run_identity(ARGS[:-1] + ["8"], {**DATA, "sft_jsonl": "cccc"}, "/m"))
    assert not resume and "train_args_sha256" in why and not list(out.glob("checkpoint-*"))
    _checkpoint(out, 1)
    resume, why = plan_resume(out, run_identity(ARGS[:-1] + ["8"], {**DATA, "sft_jsonl": "cccc"}, "/other"))
    assert not resume and "base_model" in why
    _checkpoint(out, 1)  # ZeRO shards are per rank: another world size cannot resume them
    resume, why = plan_resume(out, run_identity(ARGS[:-1] + ["8"], {**DATA, "sft_jsonl": "cccc"}, "/other", 2))
    assert not resume and why == "checkpoints of other world_size: cleared them; starting fresh"
    # Checkpoints with no recorded identity (written by hand or an older version): not trusted.
    (out / IDENTITY_FILE).unlink()
    _checkpoint(out, 3)
    assert plan_resume(out, identity) == (False, "checkpoints without a run identity: cleared them; starting fresh")
