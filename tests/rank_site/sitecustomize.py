"""Test-only TrainerCallbacks for training processes that a test does not start itself.

Python imports ``sitecustomize`` at start-up from PYTHONPATH (site's documented hook); tests put this
folder there (tests/rank_callbacks.py ``rank_env``), so the ranks that a real launch path starts
(accelerate, torchrun, a Dagster run worker, Pipes) carry these callbacks while production code knows
nothing of them. Each is added to ``transformers.trainer.DEFAULT_CALLBACKS`` (the list every Trainer
starts from) when that module is first imported; with neither variable set this file does nothing.

- RISKVA_TESTS_PAUSE_AFTER_STEP=N: after optimizer step N the rank writes OUT/debug/paused-rankR
  ("N PID") and idles until a SIGTERM/SIGINT reaches it (then the run's own handler stops it at this
  step) or it is killed, so a cancel, a preemption or a SIGKILL lands mid-run at a known step.
- RISKVA_TESTS_PARAM_DIGEST=1: when training ends each rank writes OUT/debug/rankR.json with its world
  size and a sha256 over its trainable parameters (ranks in sync; an adapter reloads exactly).
- RISKVA_TESTS_FP32_GEMM=1: bf16 matrix products on the CPU go through the float32 GEMM and are
  rounded once (fp32_gemm.py says why: this CPU's bf16 fallback runs at ~0.1 GFLOP/s).
- RISKVA_TESTS_SIGUSR1_RAISES_IN=NAME: a SIGUSR1 to the process raises SystemExit inside its thread
  called NAME, as a fatal error in that thread would (a served model's batching worker dying). It
  replaces attaching gdb to call into the interpreter: gdb cannot write the registers back on CPUs
  with AMX state ("Couldn't write extended state status: Bad address").
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

PAUSE_ENV = "RISKVA_TESTS_PAUSE_AFTER_STEP"
DIGEST_ENV = "RISKVA_TESTS_PARAM_DIGEST"
FP32_GEMM_ENV = "RISKVA_TESTS_FP32_GEMM"
RAISE_ENV = "RISKVA_TESTS_SIGUSR1_RAISES_IN"


def params_digest(model) -> str:
    """sha256 over the trainable parameters' names and float32 values."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _callbacks() -> list:
    import json
    import signal
    import time
    from pathlib import Path

    from transformers import TrainerCallback

    def debug_file(args, name: str) -> Path:
        path = Path(args.output_dir) / "debug" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    class PauseAfterStep(TrainerCallback):
        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != self.step:
                return
            signalled = []
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

            def note(signum, frame):  # then whatever the run installed (its stop-at-next-step handler)
                signalled.append(signum)
                if callable(previous[signum]):
                    previous[signum](signum, frame)

            for sig in previous:
                signal.signal(sig, note)
            debug_file(args, f"paused-rank{args.process_index}").write_text(f"{state.global_step} {os.getpid()}")
            try:
                while not signalled:
                    time.sleep(0.05)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    class ParamDigest(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            debug_file(args, f"rank{args.process_index}.json").write_text(json.dumps(
                {"rank": args.process_index, "world_size": args.world_size, "digest": params_digest(model)}))

    out = []
    if os.environ.get(PAUSE_ENV):
        out.append(PauseAfterStep(int(os.environ[PAUSE_ENV])))
    if os.environ.get(DIGEST_ENV):
        out.append(ParamDigest())
    return out


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` as usual and calls ``then(module)`` right after it loads (not before:
    importing transformers or torch here would slow every interpreter that carries this folder)."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.then(module)

        spec.loader.exec_module = exec_module
        return spec


def _install_fp32_gemm(torch_module) -> None:
    from fp32_gemm import install

    install()


if os.environ.get(PAUSE_ENV) or os.environ.get(DIGEST_ENV):
    sys.meta_path.insert(0, _AfterImport("transformers.trainer", lambda m: m.DEFAULT_CALLBACKS.extend(_callbacks())))
if os.environ.get(FP32_GEMM_ENV) == "1":
    sys.meta_path.insert(0, _AfterImport("torch", _install_fp32_gemm))


def _raise_in_named_thread(signum, frame) -> None:
    """Runs in the main thread (where Python runs signal handlers) and raises in the other one."""
    import ctypes
    import threading

    for thread in threading.enumerate():
        if thread.name == os.environ[RAISE_ENV] and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))


if os.environ.get(RAISE_ENV):
    import signal

    signal.signal(signal.SIGUSR1, _raise_in_named_thread)
