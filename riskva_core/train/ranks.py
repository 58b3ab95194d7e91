"""The processes and devices of one training run, checked before Trainer touches them.

A rank count, a backend or a GPU mapping that does not fit the host fails later and far from
its cause (an invalid device ordinal, N unsynchronised copies, DataParallel splitting pixel_values
from input_ids); here each becomes one line naming the launch flag to change.
"""
from __future__ import annotations

import sys

from transformers import TrainingArguments

from riskva_core.errors import RiskvaError

_CPU_RANKS = {"configured": False}


def cpu_ranks_configured() -> bool:
    """True once :func:`init_cpu_ranks` has set up the gloo group in this process."""
    return _CPU_RANKS["configured"]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def init_cpu_ranks(argv: list[str]) -> bool:
    """Set up the gloo process group when launched on CPU ranks; True if it did.

    Without a backend, accelerate on a CPU-only machine reports world size 1 on every rank
    (its DeepSpeed path passes no backend), so N launched ranks would silently train N
    unsynchronised copies. The state made here is what TrainingArguments then uses
    (``accelerator_config.use_configured_state``). GPUs keep upstream's nccl set-up.
    """
    import os

    import torch

    if os.environ.get("LOCAL_RANK") is None or torch.cuda.is_available():
        return False
    from accelerate import PartialState

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or any(
        a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv)
    if deepspeed:
        had = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as TrainingArguments does for --deepspeed
        PartialState(backend="gloo")
        if had is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        PartialState(cpu=True, backend="gloo")
    _CPU_RANKS["configured"] = True
    return True


def refuse_data_parallel(args: TrainingArguments) -> None:
    """One process that sees several GPUs: refuse, with the launch line to use instead.

    Trainer would wrap the model in ``nn.DataParallel``, which splits the batch along dim 0 of
    every tensor: ``pixel_values`` (one row per image patch) is cut apart from the ``input_ids``
    whose image tokens it fills, and the forward fails. One rank per GPU (DDP/DeepSpeed) does not.
    """
    import os

    import torch

    if args.use_cpu or args.deepspeed or os.environ.get("LOCAL_RANK") is not None:
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 1:
        raise RiskvaError(
            f"one process sees {n} GPUs and Trainer would wrap the model in DataParallel, which splits "
            f"pixel_values apart from input_ids; launch one rank per GPU: accelerate launch --config_file "
            f"configs/deepspeed_zero2.yaml --num_processes {n} -m riskva_core.train ... (or use one GPU: "
            f"CUDA_VISIBLE_DEVICES=0 riskva train ...)")


def check_rank_count(args: TrainingArguments) -> None:
    """Ranks on this node against the GPUs it sees, before any rank touches CUDA.

    The accelerate configs start 8 ranks (the 8-GPU host of the seed's launch line; a config file
    has no "every GPU" value). More ranks than GPUs would fail later as an invalid device ordinal
    on some ranks: refused here in one line. Fewer leaves GPUs idle: a warning from local rank 0.
    """
    import os

    import torch

    local = os.environ.get("LOCAL_WORLD_SIZE")
    if args.use_cpu or local is None or not torch.cuda.is_available():
        return
    ranks, gpus = int(local), torch.cuda.device_count()
    if ranks > gpus:
        raise RiskvaError(f"{ranks} ranks on this node but {gpus} GPU(s) visible: launch with --num_processes {gpus} "
                          f"(the accelerate configs start 8, one per GPU of an 8-GPU host)")
    if ranks < gpus and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[riskva train] warning: {ranks} rank(s) on this node and {gpus} GPUs visible: {gpus - ranks} stay "
              f"idle; --num_processes {gpus} uses them all (or hide them with CUDA_VISIBLE_DEVICES)",
              file=sys.stderr, flush=True)
