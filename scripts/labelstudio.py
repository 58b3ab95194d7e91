#!/usr/bin/env python3
"""Label Studio, the review desk, as a real local process: its own venv, bound to 127.0.0.1.

    python3 scripts/labelstudio.py start --port 8089 --data-dir $RISKVA_HOME/labelstudio \
        --document-root $RISKVA_HOME                      # what `make labelstudio` runs (foreground)

Why its own venv: Label Studio 1.23.2 pins Django 5.2, ``openai<2``, ``pyarrow<25`` and ``pytz<2023``,
which the project's venv cannot take. The venv is cached (``$RISKVA_CACHE``, default
``~/.cache/riskva/labelstudio``), created once (about 80 s, 1 GB).

Credentials: ``LABEL_STUDIO_USERNAME``/``PASSWORD``/``USER_TOKEN`` from the environment; any that is
unset is generated once and kept in ``<data dir>/credentials.env`` (mode 600; ``source`` it to get
``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` for Dagster). Values are never printed.
``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true`` is set, so the preset token works as an API token.

The database: SQLite in the data dir by default. A first start on an empty database takes about
55 s (migrations), so a prepared database per (username, token) is cached next to the venv and
copied into an empty data dir (5 s starts). Postgres instead: set ``DJANGO_DB=default`` and
``POSTGRE_NAME``/``POSTGRE_USER``/``POSTGRE_PASSWORD``/``POSTGRE_HOST``/``POSTGRE_PORT`` (Label
Studio's own variables; they pass through, and no cached database is used).

Label Studio silently moves to the next port when its port is busy, so a busy port is refused here.
Photos are served from ``--document-root`` (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) once a local
storage is registered for their folder (the labelstudio_tasks asset does it).
Stdlib only: it runs with any python3 (tests import it).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "1.23.2"
# sentry-sdk 3 (which label-studio does not cap) refuses the option Label Studio passes at start-up.
REQUIREMENTS = (f"label-studio=={VERSION}", "sentry-sdk<3")
DB_FILE = "label_studio.sqlite3"
CREDENTIALS = "credentials.env"


def cache_dir() -> Path:
    return Path(os.environ.get("RISKVA_CACHE") or Path.home() / ".cache" / "riskva") / "labelstudio"


def venv_dir() -> Path:
    return Path(os.environ.get("LABELSTUDIO_VENV") or cache_dir() / f"venv-{VERSION}")


def executable() -> Path:
    return venv_dir() / "bin" / "label-studio"


def install(quiet: bool = True) -> Path:
    """The cached venv with label-studio==VERSION (created when missing; a stamp marks it complete)."""
    venv, stamp = venv_dir(), venv_dir() / ".installed"
    wanted = " ".join(REQUIREMENTS) + "\n"
    if stamp.is_file() and executable().is_file() and stamp.read_text() == wanted:
        return executable()
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", *(["-q"] if quiet else [])]
    if not stamp.is_file():
        if venv.exists():
            shutil.rmtree(venv)  # a half-made venv from an interrupted install
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return executable()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def credentials(data_dir: Path) -> dict[str, str]:
    """Username, password and token: the environment's, else generated once and kept (mode 600)."""
    stored: dict[str, str] = {}
    path = data_dir / CREDENTIALS
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                key, value = line[len("export "):].split("=", 1)
                stored[key] = value.strip("'\"")
    out = {
        "LABEL_STUDIO_USERNAME": os.environ.get("LABEL_STUDIO_USERNAME") or stored.get("LABEL_STUDIO_USERNAME")
        or "inspector@riskva.local",
        "LABEL_STUDIO_PASSWORD": os.environ.get("LABEL_STUDIO_PASSWORD") or stored.get("LABEL_STUDIO_PASSWORD")
        or secrets.token_urlsafe(16),
        "LABEL_STUDIO_USER_TOKEN": os.environ.get("LABEL_STUDIO_USER_TOKEN") or stored.get("LABEL_STUDIO_USER_TOKEN")
        or secrets.token_hex(20),
    }
    return out


def write_credentials(data_dir: Path, creds: dict[str, str], url: str) -> Path:
    path = data_dir / CREDENTIALS
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"export {k}='{v}'" for k, v in creds.items()]
    lines += [f"export LABEL_STUDIO_URL='{url}'", f"export LABEL_STUDIO_API_KEY='{creds['LABEL_STUDIO_USER_TOKEN']}'"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def server_env(data_dir: Path, document_root: Path, creds: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(creds)
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "COLLECT_ANALYTICS": "false", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        # No error reports to Label Studio's Sentry (it is on by default): paths of field photos stay here.
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
    })
    return env


def uses_postgres() -> bool:
    return os.environ.get("DJANGO_DB", "").lower() in ("default", "postgresql")


def template_dir(creds: dict[str, str]) -> Path:
    key = hashlib.sha256(f"{VERSION}\0{creds['LABEL_STUDIO_USERNAME']}\0{creds['LABEL_STUDIO_USER_TOKEN']}".encode())
    return cache_dir() / f"db-{key.hexdigest()[:16]}"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=3) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def launch(port: int, data_dir: Path, document_root: Path, creds: dict[str, str], log: Path | None = None
           ) -> subprocess.Popen:
    """Start the server (its own process group) and return at once; ``wait_healthy`` waits for it."""
    if not port_free(port):
        raise SystemExit(f"port {port} is busy: Label Studio would silently take another one; choose a free "
                         "--port (LABELSTUDIO_PORT=...)")
    data_dir.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log is not None else None
    return subprocess.Popen([str(executable()), "start", "--no-browser", "--internal-host", "127.0.0.1",
                             "--port", str(port)], env=server_env(data_dir, document_root, creds),
                            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if proc.poll() is not None:
            raise SystemExit(f"Label Studio exited with status {proc.returncode} before answering {url}/health")
        if time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"Label Studio did not answer {url}/health within {timeout_s:.0f} s")
        time.sleep(1)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_database(data_dir: Path, document_root: Path, creds: dict[str, str]) -> bool:
    """An empty SQLite data dir gets a copy of the cached prepared database for these credentials
    (made once by a first start, then stopped). Returns True when a copy was used."""
    if uses_postgres() or (data_dir / DB_FILE).is_file():
        return False
    template = template_dir(creds)
    if not (template / DB_FILE).is_file():
        staging = template.with_name(template.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        port = free_port()
        proc = launch(port, staging, document_root, creds, log=template.parent / "prepare.log")
        try:
            wait_healthy(proc, f"http://127.0.0.1:{port}")
        finally:
            stop(proc)
        if template.exists():
            shutil.rmtree(staging, ignore_errors=True)  # another process prepared it meanwhile
        else:
            staging.rename(template)
    data_dir.mkdir(parents=True, exist_ok=True)
    for item in template.iterdir():
        if item.is_dir():
            shutil.copytree(item, data_dir / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, data_dir / item.name)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="create the cached venv with label-studio")
    start = sub.add_parser("start", help="install if needed, then run the server in the foreground")
    start.add_argument("--port", type=int, default=8089)
    start.add_argument("--data-dir", type=Path, required=True)
    start.add_argument("--document-root", type=Path, required=True)
    args = p.parse_args(argv)
    install()
    if args.command == "install":
        print(f"label-studio {VERSION} in {venv_dir()}")
        return 0
    data_dir, root = args.data_dir.resolve(), args.document_root.resolve()
    creds = credentials(data_dir)
    url = f"http://127.0.0.1:{args.port}"
    if not port_free(args.port):
        raise SystemExit(f"port {args.port} is busy: Label Studio would silently take another one; choose a free "
                         "port (make labelstudio LABELSTUDIO_PORT=...)")
    prepare_database(data_dir, root, creds)
    path = write_credentials(data_dir, creds, url)
    proc = launch(args.port, data_dir, root, creds)
    try:
        wait_healthy(proc, url)
        print(f"Label Studio: {url}  (data {data_dir}; photos under {root})\n"
              f"  credentials and the API token: source {path}\nStop with Ctrl-C.", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
