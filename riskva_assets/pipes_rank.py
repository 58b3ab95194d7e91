"""One training rank under Dagster Pipes: what every launcher runs on every rank.

    accelerate launch --config_file configs/deepspeed_zero2.yaml --num_processes N \\
        -m riskva_assets.pipes_rank <riskva_core.train flags>

(the Ray launcher calls :func:`main` in each Ray Train worker instead: riskva_assets/ray_train.py).

Rank 0 alone opens the Pipes connection: its log lines and metrics stream to the Dagster run, and
its final metrics become the ``lora_adapter`` materialization (exactly one, whatever the number of
ranks). Other ranks train with no reporter. Outside Dagster (no Pipes environment) it behaves like
``python -m riskva_core.train``. It imports ``dagster_pipes`` (the protocol library, no ``dagster``),
never the ``dagster`` package: a rank loads this module and riskva_assets' empty ``__init__``
only, not the Dagster definitions.

A wrapper module can add ``TrainerCallback``s through ``main(argv, callbacks)`` and be named as the
launcher's ``rank_module`` (tests/paused_rank.py pauses a run after a step that way).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from riskva_core.train.checkpoint import any_rank

# Exit status of a run stopped after its checkpoint: not a success for Dagster. Rank 0 also writes
# OUTPUT_DIR/stopped.json, which is how lora_adapter tells a stop (preemption: retried and resumed)
# from a crash (failed) whatever exit status the launcher makes of it.
EXIT_STOPPED = 4


def rank() -> int:
    """Global rank from the launcher's environment (torchrun, accelerate and Ray Train set RANK)."""
    for var in ("RANK", "ACCELERATE_PROCESS_INDEX", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _metadata_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


class PipesCallback(TrainerCallback):
    """Trainer's logs and metrics → Dagster Pipes, from rank 0 only (Trainer's world process zero)."""

    def __init__(self, pipes: Any):
        self.pipes = pipes

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.pipes.log.info(f"training: world size {args.world_size}, {state.max_steps} steps, "
                                f"resuming at step {state.global_step}" if state.global_step else
                                f"training: world size {args.world_size}, {state.max_steps} steps")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            self.pipes.log.info(f"step {state.global_step}: {shown}")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.pipes.log.info(f"checkpoint saved at step {state.global_step}")


class Stopped(Exception):
    """Raised by :class:`StopWhenRequested` once every rank's checkpoint is written."""

    def __init__(self, step: int):
        super().__init__(f"stopped after checkpoint-{step}")
        self.step = step


class StopWhenRequested(TrainerCallback):
    """A stop asked for without a signal (a Ray Train worker trains in a thread, where no signal
    handler can be installed): ``requested()`` true on any rank → at that same step every rank saves
    Trainer's checkpoint, then training ends as a stop (no adapter), like riskva_core.train's SIGTERM
    handler does. Place it last: the checkpoint must be complete when it ends the run."""

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested
        self.stopping = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopping and any_rank(bool(self.requested())):
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:  # after Trainer wrote this rank's part of checkpoint-N (and rank 0 its state)
            raise Stopped(state.global_step)


def report_final(pipes: Any, final: dict) -> None:
    """The one materialization of ``lora_adapter``: rank 0's final metrics and the adapter's hash."""
    from riskva_core.launch.resume import adapter_version

    meta = {k: _metadata_value(v) for k, v in final.items()}
    meta["reported_by_rank"] = rank()
    adapter = final.get("adapter_dir")
    version = adapter_version(Path(adapter)) if adapter else None
    pipes.report_asset_materialization(metadata=meta, data_version=version)


def _train(cfg, callbacks: list) -> dict:
    from riskva_core.train.sft import train

    try:
        return train(cfg, callbacks=callbacks)
    except Stopped as stop:
        return {"interrupted": True, "step": stop.step}


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    from riskva_core.errors import RiskvaError
    from riskva_core.launch.resume import STOPPED_FILE
    from riskva_core.train.config import config_from_args, init_cpu_ranks
    from riskva_core.train.outputs import dataset_fingerprint

    argv = list(sys.argv[1:] if argv is None else argv)
    callbacks = list(callbacks or [])
    try:
        init_cpu_ranks(argv)
        cfg = config_from_args(argv, description=__doc__)
        if rank() != 0:
            result = _train(cfg, callbacks)
            return EXIT_STOPPED if result.get("interrupted") else 0
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            # Pipes first: a stop callback placed last must see the checkpoint already reported.
            result = _train(cfg, [PipesCallback(pipes), *callbacks])
            if result.get("interrupted"):
                # Stopped after a checkpoint: no adapter, so no materialization.
                from riskva_core.atomic import write_json

                write_json(cfg.output_dir / STOPPED_FILE, {"step": result.get("step"), "pid": os.getpid()})
                pipes.log.warning(f"training stopped at step {result.get('step')}; checkpoint saved, "
                                  "rerun resumes with --resume_from_checkpoint auto")
                return EXIT_STOPPED
            report_final(pipes, {**result, "pixel_budget": pixel_budget_of(result),
                                 "dataset_fingerprint": dataset_fingerprint(cfg.data.dataset_path)})
        return 0
    except RiskvaError as exc:
        print(f"riskva train: error: {exc}", file=sys.stderr)
        return exc.exit_code


def pixel_budget_of(result: dict) -> dict | None:
    """The pixel policy the adapter's processor carries (read back from what was written)."""
    args = Path(result["adapter_dir"]) / "training_args.json" if result.get("adapter_dir") else None
    return json.loads(args.read_text(encoding="utf-8")).get("pixel_budget") if args and args.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
