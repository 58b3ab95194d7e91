"""The Ray job of the ``ray`` launcher: place the ranks over the cluster's nodes and train on each.

    python -m riskva_assets.ray_driver --num_ranks N --deepspeed_config configs/ds_zero2.json \
        [--placement PACK] [--cpus_per_rank 1] [--gpus_per_rank 1] -- <riskva_core.train flags>

dagster-ray submits this as the job's entrypoint on the head node, with the Pipes environment in
the job's runtime_env. Like LLaMA-Factory's Ray path it reserves a placement group of N bundles and
starts one actor per bundle; each actor runs ``python -m riskva_assets.pipes_train <flags>
--deepspeed <json>`` as its child with the torch.distributed rendezvous taken from where Ray placed
the ranks (MASTER_ADDR = rank 0's node, a free port there, RANK/WORLD_SIZE/LOCAL_RANK by node), which
is what ``accelerate launch`` or torchrun would set on one host. Rank 0 opens Pipes; its messages
come back through this driver's stdout, the job log that dagster-ray reads. The placement is written
to ``<output_dir>/ray_placement.json``.

Stop (Dagster cancel → ``ray job stop`` → SIGTERM here): every rank gets SIGTERM, saves a checkpoint
at the same step (riskva_core.train's handler) and exits; the driver exits when they all have. A rank
whose actor dies is killed with it (PR_SET_PDEATHSIG), so nothing outlives the job.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPES_LINE = '{"__dagster_pipes_version"'
EXIT_STOPPED = 4  # riskva_assets.pipes_train: stopped by SIGTERM after its checkpoint


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RankProcess:
    """A Ray actor holding one rank: the training process, its output, its stop signal."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def node(self) -> tuple[str, list[str]]:
        import ray

        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def interface(self) -> str | None:
        """The network interface carrying this node's Ray address."""
        import psutil

        ip = self.node()[0]
        return next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == ip for a in addrs)),
                    None)

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.node()[0], 0))
            return s.getsockname()[1]

    def start(self, argv: list[str], env: dict[str, str]) -> int:
        # stdout and stderr apart: a progress bar on stderr must not share a line with a Pipes message.
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     preexec_fn=_die_with_parent)
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()
        return self.proc.pid

    def _read(self, stream) -> None:
        for line in stream:
            with self.lock:
                self.lines.append(line.rstrip("\n").split("\r")[-1])

    def take_lines(self) -> list[str]:
        with self.lock:
            out, self.lines = self.lines, []
        return out

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)


def rendezvous(nodes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Per bundle (in bundle order): the rank's RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and, with GPUs, the
    node's devices. Ranks are numbered node by node (rank 0's node first) so a node's ranks are adjacent."""
    order = sorted(range(len(nodes)), key=lambda i: ([n[0] for n in nodes].index(nodes[i][0]), i))
    env: list[dict[str, str]] = [{} for _ in nodes]
    for rank, i in enumerate(order):
        ip = nodes[i][0]
        same_node = [j for j in order if nodes[j][0] == ip]
        gpus = [g for j in same_node for g in nodes[j][1]]
        env[i] = {"RANK": str(rank), "LOCAL_RANK": str(same_node.index(i)),
                  "LOCAL_WORLD_SIZE": str(len(same_node)), "WORLD_SIZE": str(len(nodes))}
        if gpus:  # Ray gives each actor its own GPU; a rank addresses the node's GPUs by LOCAL_RANK
            env[i]["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m riskva_assets.ray_driver", description=__doc__.split("\n")[0])
    parser.add_argument("--num_ranks", type=int, required=True)
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    parser.add_argument("--cpus_per_rank", type=float, default=1.0)
    parser.add_argument("--gpus_per_rank", type=float, default=0.0)
    parser.add_argument("--placement_timeout_s", type=float, default=600.0)
    if "--" not in argv:
        parser.error("the riskva_core.train flags follow `--`")
    cut = argv.index("--")
    return parser.parse_args(argv[:cut]), argv[cut + 1:]


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from riskva_core.atomic import write_text

    opts, train_args = _parse(list(sys.argv[1:] if argv is None else argv))
    ray.init(log_to_driver=False)  # RAY_ADDRESS: set by the job supervisor
    # After ray.init: Ray's core worker installs a SIGTERM handler that ends the driver at once (the ranks
    # would die with their actors, unsaved); ours makes a stop a request to every rank instead.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    bundle = {"CPU": opts.cpus_per_rank, **({"GPU": opts.gpus_per_rank} if opts.gpus_per_rank else {})}
    pg = placement_group([bundle] * opts.num_ranks, strategy=opts.placement)
    try:
        ray.get(pg.ready(), timeout=opts.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        print(f"ray_driver: error: the cluster cannot place {opts.num_ranks} ranks of {bundle} ({opts.placement}) "
              f"within {opts.placement_timeout_s:.0f}s; resources: {ray.cluster_resources()}", file=sys.stderr)
        return 2
    actor = ray.remote(RankProcess)
    ranks = [actor.options(num_cpus=opts.cpus_per_rank, num_gpus=opts.gpus_per_rank,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                           ).remote() for i in range(opts.num_ranks)]
    nodes = ray.get([r.node.remote() for r in ranks])
    envs = rendezvous(nodes)
    first = next(i for i, e in enumerate(envs) if e["RANK"] == "0")
    master = {"MASTER_ADDR": nodes[first][0], "MASTER_PORT": str(ray.get(ranks[first].free_port.remote()))}
    # Gloo advertises the address the host name resolves to (often 127.0.1.1) unless told which interface
    # to use: each rank uses the one carrying its node's Ray address, which the other nodes reach.
    for e, iface in zip(envs, ray.get([r.interface.remote() for r in ranks])):
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:
            e["GLOO_SOCKET_IFNAME"] = iface
    placement = {e["RANK"]: nodes[i][0] for i, e in enumerate(envs)}
    output_dir = _flag(train_args, "--output_dir")
    if output_dir:
        write_text(Path(output_dir) / "ray_placement.json", json.dumps(placement, indent=1, sort_keys=True) + "\n")
    print(f"ray_driver: {opts.num_ranks} ranks, master {master['MASTER_ADDR']}:{master['MASTER_PORT']}, "
          f"placement {placement}", flush=True)
    argv_rank = ["-m", "riskva_assets.pipes_train", *train_args, "--deepspeed", opts.deepspeed_config]
    ray.get([r.start.remote(argv_rank, {**e, **master}) for r, e in zip(ranks, envs)])
    codes = _watch(ranks, envs, stop)
    return 0 if all(c == 0 for c in codes) else EXIT_STOPPED if stop.is_set() else max(codes, key=abs)


def _watch(ranks: list, envs: list[dict[str, str]], stop: threading.Event) -> list[int]:
    """Relay output until every rank has exited; on stop (or a failed rank) SIGTERM all of them."""
    import ray

    signalled = False
    while True:
        for r, e in zip(ranks, envs):
            for line in ray.get(r.take_lines.remote()):
                # Rank 0's Pipes messages verbatim (dagster-ray parses the job log); anything else labelled.
                at = line.find(PIPES_LINE)
                print(line[at:] if at >= 0 else f"[rank {e['RANK']}] {line}", flush=True)
        codes = ray.get([r.poll.remote() for r in ranks])
        if all(c is not None for c in codes):
            return codes
        failed = any(c not in (None, 0) for c in codes)
        if (stop.is_set() or failed) and not signalled:
            print("ray_driver: " + ("stop requested" if stop.is_set() else f"a rank failed ({codes})")
                  + ": SIGTERM to every rank (each saves a checkpoint)", flush=True)
            ray.get([r.signal.remote(signal.SIGTERM) for r in ranks])
            signalled = True
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
