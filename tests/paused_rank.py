"""A rank entry for tests (``TrainingLauncher.rank_module="paused_rank"``): riskva_assets.pipes_rank with a
``TrainerCallback`` that idles after step 1 until the run is stopped, so a test can cancel mid-run at a
known step. Production code knows nothing of it: it comes in through the rank entry's ``callbacks``.

Each rank writes ``<output_dir>/debug/paused-rank<N>`` ("step pid") when it starts to wait. The wait ends
when a ``StopWhenRequested`` callback of the launcher (the Ray Train job's) reports a stop, which then
checkpoints at this same step; or on SIGTERM where the rank trains in its main thread (torchrun's ranks:
riskva_core.train's own handler stops them at the next step).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from riskva_assets import pipes_rank as rank
from riskva_assets.pipes_rank import StopWhenRequested

PAUSE_AFTER_STEP = 1


class PauseAfterStep(TrainerCallback):
    def __init__(self, stoppers: list[StopWhenRequested]):
        self.stoppers = stoppers
        self.signalled = False

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)

            def chained(signum, frame):  # keep the trainer's own handler (installed before ours)
                self.signalled = True
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGTERM, chained)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != PAUSE_AFTER_STEP:
            return control
        marker = Path(args.output_dir) / "debug" / f"paused-rank{args.process_index}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{state.global_step} {os.getpid()}")
        while not (self.signalled or any(s.requested() for s in self.stoppers)):
            time.sleep(0.2)
        return control


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    callbacks = list(callbacks or [])
    pause = PauseAfterStep([c for c in callbacks if isinstance(c, StopWhenRequested)])
    return rank.main(argv, [pause, *callbacks])  # before the stop callback: it sees the stop at this step


if __name__ == "__main__":
    raise SystemExit(main())
