"""Resume on retry, decided at the asset level and independent of the training engine.

A retry or re-execution of ``lora_adapter`` should continue from its own newest checkpoint
instead of starting at step 0, but must never continue from a checkpoint of other data or
another training configuration (that would silently train a model nobody asked for). So
next to the checkpoints we keep ``run_identity.json``: the upstream data versions (prepared
data, base model), the base model location, the number of ranks and a hash of the training argv. Before each
launch:

- identity on disk == this run's identity and a checkpoint exists → pass
  ``--resume_from_checkpoint auto`` (the trainer picks the newest complete checkpoint);
- otherwise → delete the ``checkpoint-N/`` folders (stale: other data or config), write the new
  identity, and start fresh.

The trainer only has to honour ``--resume_from_checkpoint auto`` and write checkpoints as
``<output_dir>/checkpoint-N/`` (transformers.Trainer's layout).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from riskva_core.atomic import write_text

IDENTITY_FILE = "run_identity.json"
RESUME_FLAG = "--resume_from_checkpoint"
# Flags that do not change what is trained: where it is written and whether it resumes.
_NEUTRAL_FLAGS = {RESUME_FLAG, "--output_dir"}


def _semantic_args(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _NEUTRAL_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def run_identity(train_args: Sequence[str], data_versions: Mapping[str, str], base_model: str,
                 world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed from (ZeRO shards are per rank, so the
    number of ranks is part of it)."""
    argv = _semantic_args(train_args)
    return {
        "data_versions": dict(sorted(data_versions.items())),
        "base_model": base_model,
        "world_size": int(world_size),
        "train_args_sha256": hashlib.sha256(json.dumps(argv).encode("utf-8")).hexdigest(),
        "train_args": argv,
    }


def checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir)
    return sorted(p for p in root.glob("checkpoint-*") if p.is_dir()) if root.is_dir() else []


def has_checkpoint(output_dir: Path) -> bool:
    return bool(checkpoints(output_dir))


def plan_resume(output_dir: Path, identity: Mapping[str, Any]) -> tuple[bool, str]:
    """(resume?, why). Clears checkpoints that belong to another identity; records this one."""
    output_dir = Path(output_dir)
    path = output_dir / IDENTITY_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous == dict(identity) and has_checkpoint(output_dir):
        return True, "same data versions, base model and training config as the checkpoints: resuming"
    why = ("no checkpoint yet" if not has_checkpoint(output_dir) else
           "checkpoints without a run identity" if previous is None else
           "checkpoints of other " + ", ".join(
               k for k in ("data_versions", "base_model", "world_size", "train_args_sha256") if previous.get(k) != identity.get(k)))
    stale = checkpoints(output_dir)
    for folder in stale:
        shutil.rmtree(folder)
    if stale:
        why += ": cleared them"
    write_text(path, json.dumps(dict(identity), ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    return False, why + "; starting fresh"


def with_resume(args: Sequence[str], resume: bool) -> list[str]:
    """``args`` without any resume flag, plus ``--resume_from_checkpoint auto`` when resuming."""
    base = [a for i, a in enumerate(args)
            if a.split("=", 1)[0] != RESUME_FLAG and not (i > 0 and args[i - 1] == RESUME_FLAG)]
    return base + ([RESUME_FLAG, "auto"] if resume else [])
