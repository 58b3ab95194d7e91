"""A real two-node Ray cluster on one machine: each node in a network namespace made here.

Two namespaces joined by a veth pair with private addresses (10.231.0.1 head, 10.231.0.2 worker);
each has only loopback and its end of the pair, so the namespace address is the only one Ray can
advertise (Ray ignores --node-ip-address=127.0.0.1 and would otherwise advertise, and connect to, the
host's own address). Everything that talks to the cluster, the Dagster side included, runs inside the
worker's namespace (``run_in``): no packet goes to the host's address. ``close`` kills what runs in
the namespaces (by pid: ``ip netns pids``) and deletes them, which removes the veth pair.

Also the Dagster side of tests/assets/test_ray_launcher.py:
``python tests/ray_netns.py materialize HOME ADDRESS [--pause]`` materializes ``lora_adapter`` with the
ray launcher on the instance in $DAGSTER_HOME and prints the run id.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBNET = ipaddress.ip_network("10.231.0.0/24")
HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"
VERSION = "v1"


class NetnsError(RuntimeError):
    """The namespaces could not be made (no root, no `ip`, no netns support)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class NetnsRayCluster:
    def __init__(self) -> None:
        tag = f"rkv{os.getpid() % 100000}"
        self.head_ns, self.worker_ns = f"{tag}h", f"{tag}w"
        self.temp = Path(tempfile.mkdtemp(prefix="rkv"))  # short: Ray's unix sockets live under it
        self.created: list[str] = []
        self.address = f"http://{HEAD_IP}:8265"

    def create(self) -> None:
        if shutil.which("ip") is None:
            raise NetnsError("the `ip` command (iproute2) is not installed")
        for ns in (self.head_ns, self.worker_ns):
            _ip("netns", "add", ns)
            self.created.append(ns)
        head_if, worker_if = f"{self.head_ns}v", f"{self.worker_ns}v"
        _ip("link", "add", head_if, "type", "veth", "peer", "name", worker_if)
        for ns, iface, addr in ((self.head_ns, head_if, HEAD_IP), (self.worker_ns, worker_if, WORKER_IP)):
            _ip("link", "set", iface, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/{SUBNET.prefixlen}", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
                # tests/ too: the paused run's rank module (tests/paused_rank.py) is imported on the nodes
                "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                # Ray's memory monitor judges the whole host, not its nodes: on a shared test box other
                # processes' memory would make it kill the job supervisor. Off for this test cluster only.
                "RAY_memory_monitor_refresh_ms": "0"}

    def run_in(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], env={**self.env(), **kw.pop("env", {})},
                              capture_output=True, text=True, **kw)

    def popen_in(self, ns: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(["ip", "netns", "exec", ns, *argv], env={**self.env(), **env},
                                    stdout=out, stderr=subprocess.STDOUT)

    def start_ray(self) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        common = ["--num-cpus=1", "--object-store-memory=80000000", "--disable-usage-stats"]
        for ns, args in ((self.head_ns, ["--head", f"--node-ip-address={HEAD_IP}", "--port=6379",
                                         f"--dashboard-host={HEAD_IP}", "--dashboard-port=8265",
                                         f"--temp-dir={self.temp}"]),
                         (self.worker_ns, [f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}"])):
            # The node's own network setting, as on any cluster whose host name does not resolve to the
            # address the other nodes reach (here every namespace shares the host's name): gloo binds the
            # namespace's interface. Ray's workers inherit the node's environment.
            done = self.run_in(ns, [ray, "start", *args, *common], timeout=180,
                               env={"GLOO_SOCKET_IFNAME": f"{ns}v"})
            if done.returncode:
                raise RuntimeError(f"ray start in {ns} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")

    def nodes(self) -> list[dict]:
        """ray.nodes() as seen by a client in the worker's namespace."""
        probe = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                 "print('NODES=' + json.dumps([{k: n[k] for k in ('NodeManagerAddress', 'NodeManagerHostname', "
                 "'Alive', 'ObjectManagerPort')} | {'GcsAddress': ray.get_runtime_context().gcs_address} "
                 "for n in ray.nodes()]))" % f"{HEAD_IP}:6379")
        done = self.run_in(self.worker_ns, [sys.executable, "-c", probe], timeout=120)
        line = next((x for x in done.stdout.splitlines() if x.startswith("NODES=")), None)
        if line is None:
            raise RuntimeError(f"ray.nodes() probe failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return json.loads(line[len("NODES="):])

    def wait_nodes(self, n: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = [x for x in self.nodes() if x["Alive"]]
            if len(nodes) >= n or time.monotonic() > deadline:
                return nodes
            time.sleep(1)

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = False
            for ns in self.created:
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), sig)
                        alive = True
                    except ProcessLookupError:
                        pass
            if alive and sig == signal.SIGTERM:
                time.sleep(3)
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()
        shutil.rmtree(self.temp, ignore_errors=True)


def materialize(home: str, address: str, pause: bool) -> int:
    """The Dagster side: lora_adapter with the ray launcher, 2 ranks on 2 nodes (STRICT_SPREAD)."""
    import dagster as dg

    from riskva_assets.assets import VERSION_ASSETS
    from riskva_assets.partitions import DATASET_VERSION
    from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher
    paths = DataRootResource(root=home)
    # --pause: every rank idles after step 1 until the cancel reaches it. A Ray Train worker trains in a
    # thread, where no signal handler can wait (tests/rank_site's pause needs one): the pause comes in
    # through the rank entry instead (tests/paused_rank.py) and ends on the job's own stop request.
    launcher = TrainingLauncher(launcher="ray", num_processes=2, ray_address=address, ray_placement="STRICT_SPREAD",
                                ray_gpus_per_rank=0, termination_timeout_s=120,
                                **({"rank_module": "paused_rank"} if pause else {}))
    instance = dg.DagsterInstance.get()
    if VERSION not in instance.get_dynamic_partitions(DATASET_VERSION):
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
    result = dg.materialize(VERSION_ASSETS, selection=["lora_adapter"], partition_key=VERSION, instance=instance,
                            run_config=dg.RunConfig(ops={"lora_adapter": {"config": TRAIN_CONFIG}}),
                            resources={"paths": paths, "mlflow": MlflowResource(paths=paths), "launcher": launcher},
                            raise_on_error=False)
    print("RUN_ID=" + result.run_id, flush=True)
    return 0 if result.success else 1


TRAIN_CONFIG = {"recipe": "demo", "max_steps": 3, "per_device_train_batch_size": 1, "seed": 7,
                "extra_args": ["--save_strategy", "no"]}

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] != ["materialize"]:
        raise SystemExit("usage: ray_netns.py materialize HOME ADDRESS [--pause]")
    raise SystemExit(materialize(sys.argv[2], sys.argv[3], "--pause" in sys.argv[4:]))
