"""Stopping and resuming around Trainer's own checkpoints (OUT/checkpoint-STEP/).

Trainer writes the checkpoint (trainable weights, optimizer — DeepSpeed's per-rank format under
ZeRO —, scheduler, data position, RNG of every rank incl. CUDA) and rotates them
(``--save_total_limit``). What it lacks and lives here:

- ``StopOnSignal``: SIGTERM/SIGINT on any rank → at the next optimizer step every rank agrees
  (an all-reduce), saves a checkpoint through Trainer and stops; the process exits 0.
- ``EpochForAugment``: tells the dataset the epoch, so image flips are a pure function of
  (seed, epoch, index) and a resumed run replays the same views.
- ``CheckpointExtras``: what a model needs besides weights (processor with the training pixel
  budget, image_policy.json, prompt_template.json), written into every checkpoint as into
  ``adapter/``, so that any ``checkpoint-N`` merges, infers and serves like the final adapter.
- ``resolve_resume``: ``--resume_from_checkpoint auto`` = the newest complete checkpoint, if any.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from riskva_core.errors import RiskvaError

STATE_FILE = "trainer_state.json"  # Trainer writes it last: its presence marks a complete checkpoint


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for d in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = d.name.rsplit("-", 1)[1]
        if step.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(step), d))
    return sorted(found)


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    if value in (None, "", "none", "None", "False", "false"):
        return None
    if value in ("auto", "True", "true"):
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise RiskvaError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (a no-op in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT → checkpoint on every rank at the same step → Trainer stops cleanly."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a server): no handler
                pass

    def on_train_end(self, args, state, control, **kwargs):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def on_step_end(self, args, state, control, **kwargs):
        # Collective: a signal seen on any rank stops all ranks at this same step.
        if any_rank(self.requested):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointExtras(TrainerCallback):
    """After Trainer saves ``checkpoint-N`` (rank 0): the processor, image policy and prompt template."""

    def __init__(self, write):
        self.write = write  # folder -> None: outputs.write_model_extras bound to this run

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.write(folder)


class EpochForAugment(TrainerCallback):
    """Sets ``dataset.epoch`` before each epoch's DataLoader iterator (and its workers) starts."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch + 1e-6) if state.epoch else 0
