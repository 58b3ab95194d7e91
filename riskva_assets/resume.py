"""Resume on retry, decided at the asset level and independent of the training engine.

A retry or re-execution of ``lora_adapter`` should continue from its own newest checkpoint
instead of starting at step 0, but must never continue from a checkpoint of other data, another
training configuration or other training code (that would silently train, and tag, a model nobody
asked for). So next to the checkpoints we keep ``run_identity.json``: the upstream data versions
(prepared data, base model), the pinned base model, the number of ranks, the training code version,
a hash of the launcher/DeepSpeed config files and of the training argv (less the flags that cannot
change the result: logging, reporting, save cadence, dataloader workers, output dir). Before each
launch (:func:`plan_resume`):

- same identity, a finished run recorded in ``run_complete.json`` and its adapter still there
  unchanged → ``reuse``: nothing is trained, the materialization says so and keeps the adapter's
  data version (same inputs and code → the same output, so nothing downstream goes stale);
- same identity, checkpoints, no finished run → ``resume`` (``--resume_from_checkpoint auto``: the
  trainer picks the newest complete checkpoint);
- anything else → ``fresh``: the checkpoints (and the old identity) are MOVED into
  ``superseded/<UTC time>-<old identity hash>/``, never deleted, and training starts at step 0. A
  finished run's checkpoints are never resumed: resuming ``checkpoint-{max_steps}`` would train 0
  steps and hand back the old weights as new work.

The trainer only has to honour ``--resume_from_checkpoint auto`` and write checkpoints as
``<output_dir>/checkpoint-N/`` (transformers.Trainer's layout).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from riskva_core.atomic import write_json, write_text

IDENTITY_FILE = "run_identity.json"
COMPLETE_FILE = "run_complete.json"
STOPPED_FILE = "stopped.json"  # riskva_assets.pipes_train: stopped by a signal after its checkpoint
SUPERSEDED_DIR = "superseded"
RESUME_FLAG = "--resume_from_checkpoint"
# Flags that do not change what is trained: where and how often it is written or logged, how many
# loader workers read the data, and whether it resumes.
NEUTRAL_FLAGS = frozenset({
    RESUME_FLAG, "--output_dir", "--overwrite_output_dir", "--run_name", "--report_to", "--disable_tqdm",
    "--logging_dir", "--logging_strategy", "--logging_steps", "--logging_first_step", "--logging_nan_inf_filter",
    "--log_level", "--log_level_replica", "--log_on_each_node",
    "--save_steps", "--save_strategy", "--save_total_limit", "--save_on_each_node",
    "--dataloader_num_workers", "--dataloader_prefetch_factor", "--dataloader_persistent_workers",
    "--dataloader_pin_memory",
})
_COMPARED = ("data_versions", "base_model", "world_size", "code_version", "launcher_config_sha256",
             "train_args_sha256")


def _semantic_args(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            if not a.startswith("--"):  # the neutral flag's value (a bare boolean flag has none)
                continue
        name = a.split("=", 1)[0]
        if name in NEUTRAL_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def config_files_digest(files: Sequence[Path]) -> str:
    """sha256 over (name, content) of the launcher's config files: a changed ZeRO stage, precision or
    optimizer offload in them changes the training as much as a flag does."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + (Path(f).read_bytes() if Path(f).is_file() else b"<missing>") + b"\0")
    return h.hexdigest()


def launcher_config_files(accelerate_config: Path, train_args: Sequence[str], cwd: Path) -> list[Path]:
    """The accelerate config, the DeepSpeed JSON it names, and a ``--deepspeed`` JSON in the flags
    (relative paths as the launcher, started in ``cwd``, reads them)."""
    import yaml

    files = [Path(accelerate_config)]
    try:
        conf = yaml.safe_load(Path(accelerate_config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        conf = {}
    named = [((conf.get("deepspeed_config") or {}) if isinstance(conf, dict) else {}).get("deepspeed_config_file")]
    for i, a in enumerate(train_args):
        if a == "--deepspeed" and i + 1 < len(train_args):
            named.append(train_args[i + 1])
        elif a.startswith("--deepspeed="):
            named.append(a.split("=", 1)[1])
    files += [p if p.is_absolute() else cwd / p for p in (Path(n) for n in named if n)]
    return files


def run_identity(train_args: Sequence[str], data_versions: Mapping[str, str], base_model: str,
                 world_size: int = 1, code_version: str = "", launcher_config_sha256: str = "") -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed from. ZeRO shards are per rank and the
    global batch is ranks x per-device batch x accumulation, so the number of ranks is part of it."""
    argv = _semantic_args(train_args)
    return {
        "data_versions": dict(sorted(data_versions.items())),
        "base_model": base_model,
        "world_size": int(world_size),
        "code_version": code_version,
        "launcher_config_sha256": launcher_config_sha256,
        "train_args_sha256": hashlib.sha256(json.dumps(argv).encode("utf-8")).hexdigest(),
        "train_args": argv,
    }


def identity_sha256(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir)
    return sorted(p for p in root.glob("checkpoint-*") if p.is_dir()) if root.is_dir() else []


def has_checkpoint(output_dir: Path) -> bool:
    return bool(checkpoints(output_dir))


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclasses.dataclass
class ResumePlan:
    action: str  # fresh | resume | reuse
    why: str
    superseded: Path | None = None  # where checkpoints of another identity were moved
    completed: dict | None = None  # reuse: the finished run's record (run_complete.json)

    @property
    def resume(self) -> bool:
        return self.action == "resume"


def plan_resume(output_dir: Path, identity: Mapping[str, Any], adapter_version: str | None = None) -> ResumePlan:
    """Decide fresh / resume / reuse (module docstring); moves aside what cannot be resumed and
    records this identity. ``adapter_version``: the content hash of the adapter now on disk."""
    output_dir = Path(output_dir)
    previous = _read(output_dir / IDENTITY_FILE)
    complete = _read(output_dir / COMPLETE_FILE)
    same = previous == dict(identity)
    found = checkpoints(output_dir)
    if same and complete is not None:
        if (adapter_version and complete.get("adapter_version") == adapter_version
                and complete.get("identity_sha256") == identity_sha256(identity)):
            return ResumePlan("reuse", f"a finished run of this same identity wrote adapter {adapter_version} "
                              f"at step {complete.get('step')}: reusing it, nothing trained", completed=complete)
        why = "the finished run of this identity no longer has its adapter: its checkpoints are not resumed"
    elif same and found:
        return ResumePlan("resume", "same data versions, base model, code, launcher and training config as the "
                          "checkpoints: resuming")
    elif not found:
        why = "no checkpoint yet"
    elif previous is None:
        why = "checkpoints without a run identity"
    else:
        why = "checkpoints of other " + ", ".join(k for k in _COMPARED if previous.get(k) != identity.get(k))
    moved = supersede(output_dir, previous) if found or complete is not None else None
    if moved is not None:
        why += f": moved them to {moved}"
    text = json.dumps(dict(identity), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    write_text(output_dir / IDENTITY_FILE, text)
    return ResumePlan("fresh", why + "; starting fresh", superseded=moved)


def supersede(output_dir: Path, previous: Mapping[str, Any] | None) -> Path:
    """Move the checkpoints, the old identity and completion record into a new ``superseded/`` folder."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = output_dir / SUPERSEDED_DIR / f"{stamp}-{identity_sha256(previous)[:12] if previous else 'unknown'}"
    target.mkdir(parents=True)
    for item in [*checkpoints(output_dir), output_dir / IDENTITY_FILE, output_dir / COMPLETE_FILE]:
        if item.exists():
            shutil.move(str(item), str(target / item.name))  # a rename within the run folder: no copy
    return target


def adapter_version(adapter_dir: Path) -> str | None:
    """Content hash of the adapter weights + config: the materialization's data version."""
    files = sorted(p for p in Path(adapter_dir).glob("adapter_*") if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def mark_complete(output_dir: Path, identity: Mapping[str, Any], adapter_version: str | None, step: Any) -> None:
    """Record that the run of ``identity`` finished and wrote ``adapter_version``."""
    write_json(Path(output_dir) / COMPLETE_FILE, {"identity_sha256": identity_sha256(identity),
                                                  "adapter_version": adapter_version, "step": step})


def with_resume(args: Sequence[str], resume: bool) -> list[str]:
    """``args`` without any resume flag, plus ``--resume_from_checkpoint auto`` when resuming."""
    base = [a for i, a in enumerate(args)
            if a.split("=", 1)[0] != RESUME_FLAG and not (i > 0 and args[i - 1] == RESUME_FLAG)]
    return base + ([RESUME_FLAG, "auto"] if resume else [])
