"""Serve a registered RisKVA model over HTTP with MLflow's scoring server.

    riskva serve                                   # models:/riskva@champion on 127.0.0.1:5001
    riskva serve --model_uri models:/riskva/3 --port 8080 --workers 2

Runs ``mlflow models serve -m URI --env-manager local`` in this environment (riskva
itself is not on a package index, so the model's own environment cannot be rebuilt
elsewhere) with ``MLFLOW_TRACKING_URI`` pointing at the data root's registry
(``sqlite:///$RISKVA_HOME/mlflow/mlflow.db``; ``RISKVA_MLFLOW_TRACKING_URI`` or
``--tracking_uri`` override it). Before starting, the URI is looked up in the registry
so that an unset alias is a one-line error instead of a server that never comes up.

Request (the pyfunc's input, see pyfunc.py): one column ``image`` of base64 JPEG/PNG::

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 photo.jpg)\\"]]}}"

Response: ``{"predictions": [{"风险": …, "风险等级": …, "纠正和预防建议": …, "缺陷描述": …,
"raw_output": …, "parse_ok": true}]}``. A corrupt image is a 400 whose message names
the row; the server keeps serving.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from riskva_core.errors import RiskvaError

DEFAULT_MODEL_URI = "models:/riskva@champion"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
# A 7B model on CPU needs minutes for a batch; MLflow's own default (60 s) would cut it off.
DEFAULT_TIMEOUT_S = 600
ENV_TRACKING_URI = "RISKVA_MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "RISKVA_MLFLOW_REGISTRY_URI"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclasses.dataclass
class ServeConfig:
    model_uri: str = DEFAULT_MODEL_URI
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    timeout: int = DEFAULT_TIMEOUT_S
    tracking_uri: str | None = None
    registry_uri: str | None = None
    check_model: bool = True

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise RiskvaError("--model_uri is empty")
        if not 1 <= int(self.port) <= 65535:
            raise RiskvaError(f"--port must be 1..65535, got {self.port}")
        if int(self.workers) < 1:
            raise RiskvaError(f"--workers must be >= 1, got {self.workers}")
        if int(self.timeout) < 1:
            raise RiskvaError(f"--timeout must be >= 1 second, got {self.timeout}")
        if not self.host:
            raise RiskvaError("--host is empty")
        self.tracking_uri = self.tracking_uri or os.environ.get(ENV_TRACKING_URI) or None
        self.registry_uri = self.registry_uri or os.environ.get(ENV_REGISTRY_URI) or None
        if self.tracking_uri is None:
            from riskva_core.paths import DataRoot

            self.tracking_uri = DataRoot.from_env().mlflow_tracking_uri

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


def request_payload(images: Sequence[bytes]) -> dict[str, Any]:
    """The JSON body for ``POST /invocations``: one row per image, base64 in column ``image``."""
    from riskva_core.schema import INPUT_COLUMN

    return {"dataframe_split": {"columns": [INPUT_COLUMN],
                                "data": [[base64.b64encode(bytes(b)).decode("ascii")] for b in images]}}


def server_env(config: ServeConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the server: the registry's URIs, and this venv's bin first on PATH
    (MLflow starts ``uvicorn`` by name)."""
    env = dict(os.environ if base is None else base)
    env["MLFLOW_TRACKING_URI"] = str(config.tracking_uri)
    env["MLFLOW_REGISTRY_URI"] = str(config.registry_uri or config.tracking_uri)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def server_command(config: ServeConfig) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", config.model_uri,
        "--env-manager", "local",
        "-h", config.host,
        "-p", str(config.port),
        "-w", str(config.workers),
        "-t", str(config.timeout),
    ]


def resolve_model(config: ServeConfig) -> str | None:
    """Check a ``models:/`` URI against the registry; return its version (None for other URIs).

    Raises a one-line RiskvaError when the model, version or alias does not exist.
    """
    match = _MODELS_URI.match(config.model_uri)
    if match is None:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.registry_uri or config.tracking_uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"no version of {name!r} has the alias {alias!r}" if alias else f"{name!r} has no version {version}"
        hint = " (promote one first, e.g. make demo)" if alias == "champion" else ""
        raise RiskvaError(f"--model_uri {config.model_uri}: {what} in {config.tracking_uri}{hint}") from None
    return str(mv.version)


def usage_text(config: ServeConfig, version: str | None = None) -> str:
    served = config.model_uri + (f" (version {version})" if version else "")
    url = config.url
    return "\n".join([
        f"Serving {served}",
        f"  registry   {config.tracking_uri}",
        f"  endpoint   {url}/invocations   (health: {url}/ping; ready once the model is loaded)",
        "",
        "Examples:",
        f"  curl -s {url}/ping",
        f"  curl -s {url}/invocations -H 'Content-Type: application/json' \\",
        '    -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 photo.jpg)\\"]]}}"',
        "",
        "Stop with Ctrl-C.",
    ])


def serve(config: ServeConfig) -> int:
    """Check the model, print where it serves, then become the MLflow server (blocks)."""
    version = resolve_model(config) if config.check_model else None
    print(usage_text(config, version), flush=True)
    command = server_command(config)
    env = server_env(config)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: signals (Ctrl-C, a supervisor's SIGTERM) reach MLflow directly, and MLflow's
    # uvicorn child dies with it (MLflow sets PR_SET_PDEATHSIG).
    os.execve(command[0], command, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riskva serve",
        description="Serve a registered model over HTTP (mlflow models serve --env-manager local). "
        "POST base64 images to /invocations; see the printed curl examples.",
    )
    p.add_argument("--model_uri", default=DEFAULT_MODEL_URI,
                   help=f"MLflow model URI: models:/riskva@<alias>, models:/riskva/<version>, runs:/<id>/model "
                   f"or a local model folder (default {DEFAULT_MODEL_URI})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to bind; 0.0.0.0 exposes it to the network (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes; each loads its own copy of the model (default 1)")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds one request may take before a 504 (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--tracking_uri", default=None,
                   help=f"MLflow tracking/registry URI (default ${ENV_TRACKING_URI}, else "
                   "sqlite:///$RISKVA_HOME/mlflow/mlflow.db)")
    p.add_argument("--no_check", dest="check_model", action="store_false",
                   help="start without first looking the model URI up in the registry")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve(ServeConfig(**vars(args)))


if __name__ == "__main__":
    raise SystemExit(main())
