"""Measuring helpers for benchmarks/full_7b_cpu.sh: one step's wall time, peak memory and disk.

    python benchmarks/full_7b_cpu.py step NAME WORK [--out_dir DIR] -- CMD...   # run CMD, append one JSON line
    python benchmarks/full_7b_cpu.py serve-one WORK MODEL_URI IMAGE             # riskva serve + one request
    python benchmarks/full_7b_cpu.py collect WORK OUT_JSON                        # steps.jsonl → one JSON + table

Memory is sampled from outside every 0.25 s as the summed RSS of the command's whole process
tree (accelerate's launcher and every rank, the server and its workers), and separately as the
largest single process, because the box's limit is what all of them hold together. Disk is the
size of the step's output folder afterwards plus the filesystem's peak growth during the step,
so a temporary copy that is deleted again (the 16 GB model copied into a temp folder) still shows.
A step that fails stops the script: the point is that every step passes with default flags.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024 ** 3


def _tree_rss(proc) -> tuple[int, int]:
    """(sum, max) RSS in bytes over ``proc`` and its descendants."""
    import psutil

    total = largest = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def _dir_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:  # hard links count once, as on disk
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


class Sampler:
    """Peak tree RSS, peak largest-process RSS and peak filesystem growth while a command runs."""

    def __init__(self, pid: int, disk_root: Path, interval: float = 0.25):
        import psutil

        self.proc = psutil.Process(pid)
        self.disk_root = disk_root
        self.disk0 = shutil.disk_usage(disk_root).used
        self.interval = interval
        self.peak_tree = self.peak_proc = self.peak_disk_growth = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        total, largest = _tree_rss(self.proc)
        self.peak_tree = max(self.peak_tree, total)
        self.peak_proc = max(self.peak_proc, largest)
        self.peak_disk_growth = max(self.peak_disk_growth, shutil.disk_usage(self.disk_root).used - self.disk0)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _record(work: Path, entry: dict) -> None:
    with (work / "steps.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    print(f"full_7b_cpu: {entry['step']}: {entry['seconds']:.0f} s, peak RSS {entry['peak_rss_gib']:.1f} GiB "
          f"(largest process {entry['peak_process_rss_gib']:.1f}), output {entry['output_gib']:.2f} GiB, "
          f"peak disk growth {entry['peak_disk_growth_gib']:.2f} GiB", file=sys.stderr, flush=True)


def _entry(name: str, t0: float, s: Sampler, out_dir: Path | None, rc: int, extra: dict | None = None) -> dict:
    return {"step": name, "rc": rc, "seconds": time.perf_counter() - t0,
            "peak_rss_gib": s.peak_tree / GIB, "peak_process_rss_gib": s.peak_proc / GIB,
            "peak_disk_growth_gib": max(0, s.peak_disk_growth) / GIB,
            "output_gib": _dir_bytes(out_dir) / GIB if out_dir else 0.0, **(extra or {})}


def step(name: str, work: Path, out_dir: Path | None, cmd: list[str]) -> int:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with Sampler(proc.pid, work) as s:
        rc = proc.wait()
    _record(work, _entry(name, t0, s, out_dir, rc))
    return rc


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_one(work: Path, model_uri: str, image: Path, tracking_uri: str, timeout: float = 1800) -> int:
    """`riskva serve` (MLflow's scoring server, default flags) until ready, one image, then stop."""
    import base64

    import requests

    port = _free_port()
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "riskva"), "serve", "--model_uri", model_uri, "--port", str(port),
           "--tracking_uri", tracking_uri]
    log = (work / "serve.log").open("w", encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    answer: dict = {}
    rc = 1
    with Sampler(proc.pid, work) as s:
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                        break
                except requests.RequestException:
                    pass
                time.sleep(2)
            ready_s = time.perf_counter() - t0
            body = {"dataframe_split": {"columns": ["image"],
                                        "data": [[base64.b64encode(image.read_bytes()).decode("ascii")]]}}
            r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=timeout)
            answer = {"status": r.status_code, "ready_seconds": ready_s, "body": r.json() if r.ok else r.text[:500]}
            rc = 0 if r.ok and not r.json()["predictions"][0].get("error") else 1
        except Exception as exc:  # the measurement must still be recorded, then the script fails
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    _record(work, _entry("serve", t0, s, None, rc, {"answer": answer}))
    return rc


def collect(work: Path, out: Path) -> None:
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
    info_file = work / "model_info.json"
    result = {"model": json.loads(info_file.read_text()) if info_file.is_file() else {},
              "mode": (work / "mode.txt").read_text().strip(), "steps": steps,
              "max_peak_rss_gib": max(s["peak_rss_gib"] for s in steps)}
    for name, rel in (("train_metrics", "train/adapter/metrics.json"), ("merge_report", "merged/merge_report.json")):
        path = work / rel
        if path.is_file():
            data = json.loads(path.read_text())
            result[name] = data.get("final", data) if name == "train_metrics" else data
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    print("| step | wall | peak RSS (all processes) | largest process | output on disk | peak disk growth |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in steps:
        print(f"| {s['step']} | {s['seconds']:.0f} s | {s['peak_rss_gib']:.1f} GiB | {s['peak_process_rss_gib']:.1f} GiB "
              f"| {s['output_gib']:.2f} GiB | {s['peak_disk_growth_gib']:.2f} GiB |")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("name")
    s.add_argument("work", type=Path)
    s.add_argument("--out_dir", type=Path)
    v = sub.add_parser("serve-one")
    v.add_argument("work", type=Path)
    v.add_argument("model_uri")
    v.add_argument("image", type=Path)
    v.add_argument("--tracking_uri", required=True)
    c = sub.add_parser("collect")
    c.add_argument("work", type=Path)
    c.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "step":
        if not cmd:
            p.error("step needs a command after --")
        return step(a.name, a.work, a.out_dir, cmd)
    if a.cmd == "serve-one":
        return serve_one(a.work, a.model_uri, a.image, a.tracking_uri)
    collect(a.work, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
