"""Resume identity and the finished run's lineage record, free of Dagster (the ``lora_adapter``,
``merged_model`` and ``registered_model`` assets call it).

A retry or re-execution of a training run should continue from its own newest checkpoint instead
of starting at step 0, but must never continue from a checkpoint of other data, another training
configuration or other training code (that would silently train, and tag, a model nobody asked
for). So next to the checkpoints we keep ``run_identity.json``: the upstream data versions
(prepared data, base model), the pinned base model, the number of ranks, the training code
version, a hash of the launcher/DeepSpeed config files and of the PARSED training configuration
(:func:`train_config`: what the flags mean, not how they are spelled, less the fields that cannot
change the weights, :data:`NEUTRAL_FIELDS`). Before each launch (:func:`plan_resume`):

- same identity, a finished run recorded in ``run_complete.json`` and its adapter still there,
  unchanged and carrying its lineage record → ``reuse``: nothing is trained;
- same identity, checkpoints, no finished run → ``resume`` (``--resume_from_checkpoint auto``);
- anything else → ``fresh``: the checkpoints, the old identity, the completion record AND the old
  ``adapter/`` are MOVED into ``superseded/<UTC time>-<old identity hash>/``, never deleted, and
  training starts at step 0. So a run that then fails leaves no adapter behind to be merged and
  registered as if it were the new run's.

``run_identity.json`` describes the checkpoints being written, so it is written before training.
What describes the weights, ``adapter/lineage.json`` (:func:`write_lineage`), is written only when a
run has finished, by the process that launched it: the data versions the run read, the pinned base
model, the code version, the parsed configuration and seed. Merge and registration read it
(:func:`lineage_differences`, :func:`lineage_tags`), never the state of the world at their own time.

Code versions (:func:`source_version`) hash what the code means too: the syntax tree of each
Python file without its docstrings (comments are not in it), and config files as parsed data, so a
``git pull`` that only touched comments or docstrings resumes instead of restarting at step 0. The
tree's text is Python's ``ast.dump``: a new Python minor version may change it (a new identity).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from riskva_core.atomic import write_json, write_text
from riskva_core.errors import RiskvaError

IDENTITY_FILE = "run_identity.json"
COMPLETE_FILE = "run_complete.json"
STOPPED_FILE = "stopped.json"  # riskva_assets.pipes_rank: stopped by a signal after its checkpoint
LINEAGE_FILE = "lineage.json"  # in adapter/: the finished run's record of what produced these weights
SUPERSEDED_DIR = "superseded"
RESULT_DIRS = ("adapter", "model")  # a run's result: LoRA adapter, or full fine-tune (train/outputs.py)
RESUME_FLAG = "--resume_from_checkpoint"
# Parsed fields (TrainingArguments names) that do not change the weights: where the run writes and
# whom it reports to (output/run names, report_to, trackio/hub uploads, progress bars), how much it
# logs, how many loader workers read the (same, identically ordered) batches, and whether it
# resumes. hub_token is also a secret that must not land in run_identity.json.
NEUTRAL_FIELDS = frozenset({
    "resume_from_checkpoint", "output_dir", "overwrite_output_dir", "run_name", "report_to", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "disable_tqdm",
    "logging_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "log_on_each_node",
    "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
    "hub_revision",
    "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers",
    "dataloader_pin_memory",
})
# Save cadence is neutral too, unless --load_best_model_at_end picks the result among the saved
# checkpoints: then which steps are saved decides which weights come out.
SAVE_FIELDS = frozenset({"save_strategy", "save_steps", "save_total_limit", "save_on_each_node"})
_COMPARED = ("data_versions", "base_model", "world_size", "code_version", "launcher_config_sha256",
             "train_config_sha256")


def _plain(value: Any) -> Any:
    """A parsed value as JSON: enums by value, paths as text."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _without_neutral(argv: Sequence[str]) -> list[str]:
    """``argv`` less every neutral flag and ALL the values after it, whatever the spelling
    (``--report_to tensorboard mlflow``, ``--report-to=x``, ``--no_dataloader_pin_memory``): a value
    the parser would not take (a second ``--report_to`` value) must not enter the identity either."""
    out: list[str] = []
    skipping = False
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            skipping = name in NEUTRAL_FIELDS or (name.startswith("no_") and name[3:] in NEUTRAL_FIELDS)
        if not skipping:
            out.append(a)
    return out


def train_config(train_args: Sequence[str]) -> dict[str, Any]:
    """The training configuration ``train_args`` means, as ``riskva_core.train`` parses it (the recipe
    underneath, then the flags; every field with its value), less the neutral fields.

    Parsed by the same HfArgumentParser with the same recipe placement as train/config.py
    ``config_from_args``, so ``--x=v`` and ``--x v``, an alias, ``1e-4`` and ``0.0001``, or a flag
    given at its default value are the same configuration. Only the parse: the dataclasses'
    validation needs the training host (GPUs, ranks) and runs there, so a value of the wrong type
    fails here (one line) and an out-of-range one fails the launched run. Flags the parser does not know stay in, verbatim; neutral flags
    are dropped before the parse with all their values (:func:`_without_neutral`).
    """
    from riskva_core.train.config import build_parser, explicit_flags, fit_recipe
    from riskva_core.train.recipes import recipe_flags, to_argv

    argv = _without_neutral([str(a) for a in train_args])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            given = explicit_flags(argv)
            name, recipe = recipe_flags(given.get("recipe", "auto"), given.get("model_name_or_path"))
            namespace, unknown = build_parser().parse_known_args(to_argv(fit_recipe(name, recipe, given)) + argv)
    except (SystemExit, ValueError) as exc:  # argparse reports a bad flag by exiting
        lines = (err.getvalue().strip() or str(exc)).splitlines()
        raise RiskvaError(f"training flags: {lines[-1] if lines else exc}") from None
    fields = {k: _plain(v) for k, v in sorted(vars(namespace).items())}
    fields["recipe"] = name
    neutral = NEUTRAL_FIELDS | (frozenset() if fields.get("load_best_model_at_end") else SAVE_FIELDS)
    out = {k: v for k, v in fields.items() if k not in neutral}
    if unknown:
        out["unparsed_flags"] = unknown
    return out


def config_files_digest(files: Sequence[Path]) -> str:
    """sha256 over (name, parsed content) of the launcher's config files: a changed ZeRO stage,
    precision or optimizer offload in them changes the training as much as a flag does (a comment
    does not)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + (_content(Path(f)) if Path(f).is_file() else b"<missing>") + b"\0")
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
    config = train_config(train_args)
    return {
        "data_versions": dict(sorted(data_versions.items())),
        "base_model": base_model,
        "world_size": int(world_size),
        "code_version": code_version,
        "launcher_config_sha256": launcher_config_sha256,
        "train_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest(),
        "train_config": config,
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
    superseded: Path | None = None  # where checkpoints and the adapter of another identity were moved
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
    results = [output_dir / d for d in RESULT_DIRS if (output_dir / d).exists()]
    if same and complete is not None:
        record = read_lineage(output_dir / "adapter") or {}
        if (adapter_version and complete.get("adapter_version") == adapter_version
                and complete.get("identity_sha256") == identity_sha256(identity)
                and record.get("run_identity") == identity_sha256(identity)):
            return ResumePlan("reuse", f"a finished run of this same identity wrote adapter {adapter_version} "
                              f"at step {complete.get('step')}: reusing it, nothing trained", completed=complete)
        why = "the finished run of this identity no longer has its adapter and record: its checkpoints are not resumed"
    elif same and found:
        return ResumePlan("resume", "same data versions, base model, code, launcher and training config as the "
                          "checkpoints: resuming")
    elif not found:
        why = "no checkpoint yet" + (f" ({', '.join(p.name for p in results)}/ of an earlier run)" if results else "")
    elif previous is None:
        why = "checkpoints without a run identity"
    else:
        why = "checkpoints of other " + ", ".join(k for k in _COMPARED if previous.get(k) != identity.get(k))
    moved = supersede(output_dir, previous) if found or complete is not None or results else None
    if moved is not None:
        why += f": moved them to {moved}"
    text = json.dumps(dict(identity), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    write_text(output_dir / IDENTITY_FILE, text)
    return ResumePlan("fresh", why + "; starting fresh", superseded=moved)


def supersede(output_dir: Path, previous: Mapping[str, Any] | None) -> Path:
    """Move the checkpoints, the old identity, the completion record and the old result folder
    (``adapter/`` with its lineage record) into a new ``superseded/`` folder."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = output_dir / SUPERSEDED_DIR / f"{stamp}-{identity_sha256(previous)[:12] if previous else 'unknown'}"
    target.mkdir(parents=True)
    items = [*checkpoints(output_dir), output_dir / IDENTITY_FILE, output_dir / COMPLETE_FILE,
             *(output_dir / d for d in RESULT_DIRS)]
    for item in items:
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


# --- the finished run's lineage record -------------------------------------------------------

def finished_run_record(identity: Mapping[str, Any], adapter_dir: Path, *, data_versions: Mapping[str, str],
                        code_versions: Mapping[str, str], base_model: Mapping[str, Any], step: Any,
                        **extra: Any) -> dict[str, Any]:
    """What produced the weights in ``adapter_dir``, as the run that just finished knows it.

    ``data_versions``: the upstream versions it read (the identity's, plus what they were built
    from); ``code_versions``: name → version of the code that trained; ``base_model``: the pinned
    base (``name``, ``identity``, ``revision``); ``extra``: the orchestrator's own ids (run id …).
    """
    config = dict(identity.get("train_config") or {})
    return {
        "adapter_version": adapter_version(adapter_dir),
        "data_versions": dict(sorted(data_versions.items())),
        "code_versions": dict(sorted(code_versions.items())),
        "base_model": dict(base_model),
        "train_config": config,
        "seed": config.get("seed"),
        "recipe": config.get("recipe"),
        "train_config_sha256": identity.get("train_config_sha256"),
        "world_size": identity.get("world_size"),
        "launcher_config_sha256": identity.get("launcher_config_sha256"),
        "run_identity": identity_sha256(identity),
        "step": step,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def write_lineage(adapter_dir: Path, record: Mapping[str, Any]) -> None:
    write_json(Path(adapter_dir) / LINEAGE_FILE, dict(record))


def read_lineage(adapter_dir: Path) -> dict | None:
    return _read(Path(adapter_dir) / LINEAGE_FILE)


def newest_superseded_lineage(output_dir: Path) -> tuple[Path, dict | None] | None:
    """(folder, record) of the adapter most recently moved aside, if one was."""
    moved = sorted((Path(output_dir) / SUPERSEDED_DIR).glob("*/adapter"))
    return (moved[-1], read_lineage(moved[-1])) if moved else None


def _shown(value: Any) -> str:
    return "none" if value in (None, "") else str(value)


def lineage_differences(record: Mapping[str, Any], data_versions: Mapping[str, str],
                        code_versions: Mapping[str, str]) -> list[str]:
    """Where ``record`` does not match the current upstream, one phrase each ("sft_jsonl data version
    X vs Y": recorded vs now). Only what is known now is compared: an upstream that was never
    materialized here cannot be said to differ."""
    out = []
    for kind, now, recorded in (("data", data_versions, record.get("data_versions") or {}),
                                ("code", code_versions, record.get("code_versions") or {})):
        out += [f"{name} {kind} version {_shown(recorded.get(name))} vs {_shown(value)}"
                for name, value in sorted(now.items()) if value and recorded.get(name) != value]
    return out


def tag_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def lineage_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """Registry tags from a finished run's record alone: the same record always gives the same tags."""
    base = record.get("base_model") or {}
    tags = {
        "base_model": base.get("name"),
        **{f"base_model.{k}": base.get(k) for k in ("identity", "revision")},
        **{f"data_version.{k}": v for k, v in (record.get("data_versions") or {}).items()},
        **{f"code_version.{k}": v for k, v in (record.get("code_versions") or {}).items()},
        "adapter_version": record.get("adapter_version"),
        "git_commit": record.get("git_commit"),
        "dataset_version": record.get("dataset_version"),
        "dataset_fingerprint": record.get("dataset_fingerprint"),
        **{f"train.{k}": record.get(k) for k in ("run_identity", "train_config_sha256", "seed", "recipe", "step",
                                                   "world_size", "finished_at", "dagster_run_id")},
    }
    return {k: tag_text(v) for k, v in tags.items() if v not in (None, "")}


# --- code versions -----------------------------------------------------------------------------

def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return tree


def _content(path: Path) -> bytes:
    """What a file means to the code version: a Python file's syntax tree without docstrings
    (comments and layout are not in it), a JSON/YAML file's parsed data; other files' bytes. A file
    that does not parse counts as its bytes (running it fails anyway)."""
    import yaml

    raw = path.read_bytes()
    if path.suffix == ".py":
        return _python_meaning(raw, str(path))
    try:
        if path.suffix == ".json":
            return json.dumps(json.loads(raw), sort_keys=True).encode()
        if path.suffix in (".yaml", ".yml"):
            return json.dumps(yaml.safe_load(raw), sort_keys=True, default=str).encode()
    except (ValueError, UnicodeDecodeError, yaml.YAMLError):
        return raw
    return raw


# Every Dagster process (webserver, code server, daemon, each CLI call) hashes all assets' sources
# at import, and the assets share most of riskva_core: one parse per file content and process, not
# one per asset. The key is the file's bytes, so an edited file is never answered from the cache of a
# long-lived process such as `dagster dev`.
@functools.lru_cache(maxsize=4096)
def _python_meaning(raw: bytes, filename: str) -> bytes:
    try:
        return ast.dump(_strip_docstrings(ast.parse(raw, filename=filename))).encode()
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return raw


def source_version(sources: Sequence[str], root: Path) -> str:
    """sha256[:16] over (path, meaning) of the given files and every *.py under the given folders."""
    h = hashlib.sha256()
    for item in sources:
        target = Path(root) / item
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(_content(f) if f.is_file() else b"<missing>")
            h.update(b"\0")
    return h.hexdigest()[:16]
