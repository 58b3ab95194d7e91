"""The Ray job of the ``ray`` launcher: Ray Train's ``TorchTrainer`` runs one rank per worker.

    python -m riskva_assets.ray_train --num_ranks N --deepspeed_config configs/ds_zero2.json \\
        [--placement PACK] [--cpus_per_rank 1] [--gpus_per_rank 1] [--max_failures 0] \\
        [--rank_module riskva_assets.pipes_rank] -- <riskva_core.train flags>

dagster-ray submits this as the job's entrypoint, with the Pipes environment in the job's
runtime_env. ``ScalingConfig`` carries the ranks, CPUs/GPUs per rank and the placement strategy;
``RunConfig`` the storage path (``<output_dir>/ray_train`` on the shared data root) and
``FailureConfig(max_failures)``. Ray Train places the workers, sets up the torch.distributed
process group (gloo on CPU, nccl on GPU; MASTER_ADDR/PORT from rank 0's node) and sets RANK,
WORLD_SIZE, LOCAL_RANK and ACCELERATE_TORCH_DEVICE; each worker then runs the same rank entry
(pipes_rank.py) with ``--deepspeed <json>``, which DeepSpeed and accelerate join instead of making a
group of their own.

Checkpoints are Trainer's own ``checkpoint-N`` in the output dir on the shared data root (not Ray
Train's reported checkpoints, which would copy each one): a re-execution resumes them through
``--resume_from_checkpoint auto``, and a worker group that Ray Train restarts (``max_failures``)
resumes from the newest one this job wrote.

Pipes: rank 0 writes its messages to a file of its own (``<storage>/<job>-pipes.jsonl``) and this
driver prints them verbatim to its stdout, the job log dagster-ray reads; the workers' own output
reaches that log through Ray with its ``(RayTrainWorker ...)`` prefix, where a progress bar cannot
split a message.

Stop (Dagster cancel → ``ray job stop`` → SIGTERM here): the driver sets a flag every worker polls
after each optimizer step (a worker trains in a thread: no signal reaches its loop); at the same
step every rank saves its checkpoint, the run ends and the job exits with status 4.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from riskva_core.launch.commands import PLACEMENTS, REPO_ROOT, check_gpus_per_rank, flag_value

EXIT_STOPPED = 4  # rank.EXIT_STOPPED: stopped after a checkpoint


def scaling_config(num_ranks: int, cpus_per_rank: float, gpus_per_rank: float, placement: str):
    """Ray Train's ScalingConfig for N data-parallel ranks; refuses GPU shares a rank cannot use."""
    from ray.train import ScalingConfig

    gpus = check_gpus_per_rank(gpus_per_rank)
    return ScalingConfig(num_workers=num_ranks, use_gpu=bool(gpus),
                         resources_per_worker={"CPU": cpus_per_rank, **({"GPU": gpus} if gpus else {})},
                         placement_strategy=placement)


def run_config(storage: Path, name: str, max_failures: int):
    from ray.train import FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures))


class StopFlag:
    """A Ray actor the driver sets on stop and every worker reads after each step."""

    def __init__(self) -> None:
        self.requested = False

    def set(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested


def _newest_checkpoint(output_dir: Path) -> str | None:
    from riskva_core.train.checkpoint import list_checkpoints

    found = list_checkpoints(output_dir)
    return found[-1][1].name if found else None


def train_worker(config: dict) -> None:
    """One Ray Train worker: the rank entry's ``main`` with a stop that needs no signal."""
    import ray
    import ray.train
    import torch.distributed as dist
    from dagster_pipes import DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param

    from riskva_core.atomic import write_text
    from riskva_assets.pipes_rank import StopWhenRequested

    # The repository checkout, as for the local launcher's ranks: relative paths in the flags (the
    # DeepSpeed JSON) mean the same on every node, wherever Ray starts its worker processes.
    os.chdir(REPO_ROOT)
    argv = list(config["argv"])
    output_dir = Path(config["output_dir"])
    world_rank = ray.train.get_context().get_world_rank()
    # Which node each rank is on, from the group Ray Train made (the record a reader checks placement by).
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.util.get_node_ip_address())
    if world_rank == 0:
        write_text(output_dir / "ray_placement.json", json.dumps(dict(enumerate(nodes)), indent=1) + "\n")
        os.environ[DAGSTER_PIPES_MESSAGES_ENV_VAR] = encode_param({"path": config["pipes_file"]})
    # Restarted by Ray Train after a failure: continue from the newest checkpoint this job wrote.
    newest = _newest_checkpoint(output_dir)
    if flag_value(argv, "--resume_from_checkpoint") is None and newest and newest != config["initial_checkpoint"]:
        argv += ["--resume_from_checkpoint", "auto"]
    flag = config["stop"]
    stop = StopWhenRequested(lambda: ray.get(flag.is_set.remote()))
    code = importlib.import_module(config["rank_module"]).main(argv, callbacks=[stop])
    if code not in (0, EXIT_STOPPED):
        raise RuntimeError(f"rank {world_rank} exited with status {code}")


def relay(path: Path, done: threading.Event) -> None:
    """Print each complete line of rank 0's Pipes file to stdout until ``done`` and the file is read."""
    offset, pending = 0, b""
    while True:
        finished = done.is_set()
        if path.is_file():
            with open(path, "rb") as f:  # bytes: a line still being written may end mid-character
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                print(line.decode("utf-8"), flush=True)
        if finished:
            return
        time.sleep(0.2)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m riskva_assets.ray_train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--num_ranks", type=int, required=True)
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--placement", default="PACK", choices=PLACEMENTS)
    parser.add_argument("--cpus_per_rank", type=float, default=1.0)
    parser.add_argument("--gpus_per_rank", type=float, default=0.0)
    parser.add_argument("--max_failures", type=int, default=0)
    parser.add_argument("--rank_module", default="riskva_assets.pipes_rank")
    if "--" not in argv:
        parser.error("the riskva_core.train flags follow `--`")
    cut = argv.index("--")
    return parser.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray.train.torch import TorchTrainer

    from riskva_core.errors import RiskvaError
    from riskva_core.launch.resume import STOPPED_FILE

    opts, train_args = _parse(list(sys.argv[1:] if argv is None else argv))
    output = flag_value(train_args, "--output_dir")
    if not output:
        print("ray_train: error: --output_dir (on the data root every node shares) is required", file=sys.stderr)
        return 2
    try:
        scaling = scaling_config(opts.num_ranks, opts.cpus_per_rank, opts.gpus_per_rank, opts.placement)
    except RiskvaError as exc:
        print(f"ray_train: error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(output).resolve()
    ray.init()  # RAY_ADDRESS: set by the job supervisor
    # One Ray Train run per job: a name reused in the same storage would restore that run's state.
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-job{ray.get_runtime_context().get_job_id()}"
    storage = output_dir / "ray_train"
    pipes_file = storage / f"{name}-pipes.jsonl"  # beside Ray Train's run folder, not in it
    storage.mkdir(parents=True, exist_ok=True)
    # After ray.init: Ray's driver would exit at once on SIGTERM (the workers dying with it, unsaved);
    # ours turns a stop into a request every rank honours at its next step.
    stop, flag = threading.Event(), ray.remote(num_cpus=0)(StopFlag).remote()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def forward_stop() -> None:
        stop.wait()
        print("ray_train: stop requested: every rank saves a checkpoint at its next step", flush=True)
        ray.get(flag.set.remote())

    threading.Thread(target=forward_stop, daemon=True).start()
    done = threading.Event()
    relaying = threading.Thread(target=relay, args=(pipes_file, done), daemon=True)
    relaying.start()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"argv": [*train_args, "--deepspeed", opts.deepspeed_config], "stop": flag,
                           "output_dir": str(output_dir), "pipes_file": str(pipes_file),
                           "rank_module": opts.rank_module, "initial_checkpoint": _newest_checkpoint(output_dir)},
        scaling_config=scaling, run_config=run_config(storage, name, opts.max_failures))
    print(f"ray_train: {opts.num_ranks} ranks ({opts.placement}, {scaling.resources_per_worker} each), "
          f"storage {storage / name}", flush=True)
    try:
        trainer.fit()
    finally:
        done.set()
        relaying.join()
        pipes_file.unlink(missing_ok=True)  # relayed: the job log holds the messages
    return EXIT_STOPPED if stop.is_set() or (output_dir / STOPPED_FILE).is_file() else 0


if __name__ == "__main__":
    raise SystemExit(main())
