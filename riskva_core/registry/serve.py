"""Serve a registered RisKVA model over HTTP with MLflow's scoring server.

    riskva serve                                   # models:/riskva@champion on 127.0.0.1:5001
    riskva serve --model_uri models:/riskva/3 --port 8080 --workers 2
    riskva serve --api openai                      # POST /v1/chat/completions (openai_api.py)

Runs MLflow's scoring server (the app ``mlflow models serve -m URI --env-manager local``
runs) under uvicorn in this environment, with a body limit in front (scoring_app.py), and
``MLFLOW_TRACKING_URI`` pointing at the data root's registry
(``sqlite:///$RISKVA_HOME/mlflow/mlflow.db``; ``RISKVA_MLFLOW_TRACKING_URI`` or
``--tracking_uri`` override it). Before starting, the URI is looked up in the registry
so that an unset alias is a one-line error instead of a server that never comes up.

Request (the pyfunc's input, see pyfunc.py): one column ``image`` of base64 JPEG/PNG::

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 photo.jpg)\\"]]}}"

Response: ``{"predictions": [{"风险": …, "风险等级": …, "纠正和预防建议": …, "缺陷描述": …,
"raw_output": …, "parse_ok": true, "error": ""}]}``. A bad row gets its ``error`` and the
others are answered; a request over a limit, or none of whose rows can be answered, is a 400
naming the rows (pyfunc.py). The server keeps serving.

Limits (``--max_rows``, ``--max_request_bytes``, ``--max_decoded_pixels``) and the load dtype
(``--torch_dtype``) default to the registered version's ``model_config``; given here they override
it at load time through MLflow's ``MLFLOW_PYFUNC_INFERENCE_CONFIG``, for either API. The byte limit
also caps the HTTP body, for both APIs, before it is read or parsed (a 413, limits.py). ``--timeout``
is each request's deadline (504). ``--max_queue`` and ``--max_wait_ms`` tune the OpenAI server's
batching (batching.py).

A ``models:/`` version whose artifacts are on this machine's file system (the default sqlite +
local-artifacts registry) is served from its artifact folder in place; only a remote artifact
store is downloaded (once, into a temporary folder), so a 7B needs no second 16 GB at start-up.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from riskva_core.errors import RiskvaError
from riskva_core.registry.batching import DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS

DEFAULT_MODEL_URI = "models:/riskva@champion"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
# A 7B model on CPU needs minutes for a batch; MLflow's own default (60 s) would cut it off.
DEFAULT_TIMEOUT_S = 600
ENV_TRACKING_URI = "RISKVA_MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "RISKVA_MLFLOW_REGISTRY_URI"
APIS = ("mlflow", "openai")
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
    api: str = "mlflow"
    max_rows: int | None = None
    max_request_bytes: int | None = None
    max_decoded_pixels: int | None = None
    torch_dtype: str | None = None
    artifact_dir: str | None = None  # set by serve(): the version's local artifact folder, loaded in place
    model_version: str | None = None  # set by serve(): the version behind the URI, traced with each answer
    max_queue: int = DEFAULT_MAX_QUEUE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS

    def __post_init__(self) -> None:
        if int(self.max_queue) < 1:
            raise RiskvaError(f"--max_queue must be >= 1, got {self.max_queue}")
        if not 0 <= float(self.max_wait_ms) <= 1000:
            raise RiskvaError(f"--max_wait_ms must be 0..1000, got {self.max_wait_ms}")
        if self.api not in APIS:
            raise RiskvaError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        for name in ("max_rows", "max_request_bytes", "max_decoded_pixels"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise RiskvaError(f"--{name} must be >= 1, got {value}")
        if not self.model_uri:
            raise RiskvaError("--model_uri is empty")
        if self.torch_dtype is not None:
            from riskva_core.model.loading import resolve_dtype

            resolve_dtype(self.torch_dtype, "cpu")  # auto|bfloat16|float32; float16 refused with the reason
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

    def overrides(self) -> dict[str, Any]:
        """The pyfunc ``model_config`` keys this server overrides (its limits and load dtype)."""
        limits: dict[str, Any] = {k: int(v) for k in ("max_rows", "max_request_bytes", "max_decoded_pixels")
                                  if (v := getattr(self, k)) is not None}
        return {**limits, "torch_dtype": self.torch_dtype} if self.torch_dtype is not None else limits

    @property
    def load_uri(self) -> str:
        """What the server loads: the local artifact folder when there is one, else the URI."""
        return self.artifact_dir or self.model_uri

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
    if config.overrides():
        env["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = json.dumps(config.overrides())
    if config.api == "openai":
        from riskva_core.registry.openai_api import ENV_CONFIG

        # No body limit of its own: the app takes the loaded model's max_request_bytes (which
        # --max_request_bytes overrides through MLFLOW_PYFUNC_INFERENCE_CONFIG), as scoring_app does.
        env[ENV_CONFIG] = json.dumps({
            "model_uri": config.load_uri, "model_name": _model_name(config.model_uri),
            "served_uri": config.model_uri, "model_version": config.model_version,
            "max_request_bytes": config.max_request_bytes,
            "timeout_s": config.timeout, "max_queue": config.max_queue, "max_wait_ms": config.max_wait_ms})
    else:
        from riskva_core.registry import scoring_app

        env[scoring_app.ENV_CONFIG] = json.dumps({"model_uri": config.load_uri, "served_uri": config.model_uri,
                                                  "model_version": config.model_version})
        env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(config.timeout)  # MLflow's own 504
    return env


def _model_name(uri: str) -> str:
    match = _MODELS_URI.match(uri)
    return match["name"] if match else "riskva"


def server_command(config: ServeConfig) -> list[str]:
    """uvicorn with a factory: each worker loads the pyfunc itself."""
    factory = ("riskva_core.registry.openai_api:app_from_env" if config.api == "openai"
               else "riskva_core.registry.scoring_app:app_from_env")
    return [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", config.host, "--port", str(config.port),
            "--workers", str(config.workers), "--timeout-keep-alive", "30"]


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
    if config.api == "openai":
        return "\n".join([
            f"Serving {served} (OpenAI-compatible)",
            f"  registry   {config.tracking_uri}",
            *_artifacts_line(config),
            f"  endpoint   {url}/v1/chat/completions   (health: {url}/health; ready: {url}/ready; "
            f"metrics: {url}/metrics)",
            "",
            "Examples:",
            "  printf '{\"model\": \"riskva\", \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": "
            "\"image_url\", \"image_url\": {\"url\": \"data:image/jpeg;base64,%s\"}}]}]}' \"$(base64 -w0 photo.jpg)\" \\",
            f"    | curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d @-",
            "",
            "Stop with Ctrl-C.",
        ])
    return "\n".join([
        f"Serving {served}",
        f"  registry   {config.tracking_uri}",
        *_artifacts_line(config),
        f"  endpoint   {url}/invocations   (health: {url}/ping; ready once the model is loaded)",
        "",
        "Examples:",
        f"  curl -s {url}/ping",
        f"  curl -s {url}/invocations -H 'Content-Type: application/json' \\",
        '    -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 photo.jpg)\\"]]}}"',
        "",
        "Stop with Ctrl-C.",
    ])


def _artifacts_line(config: ServeConfig) -> list[str]:
    return [f"  artifacts  {config.artifact_dir} (loaded in place)"] if config.artifact_dir else []


def serve(config: ServeConfig) -> int:
    """Check the model, print where it serves, then become the server (uvicorn; blocks)."""
    from riskva_core.registry.storage import local_model_dir

    version = resolve_model(config) if config.check_model else None
    config.model_version = version  # traced with every answer (tracing.py); resolved once, here
    local = local_model_dir(config.model_uri, str(config.tracking_uri), config.registry_uri)
    config.artifact_dir = str(local) if local is not None else None
    print(usage_text(config, version), flush=True)
    command = server_command(config)
    env = server_env(config)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: signals (Ctrl-C, a supervisor's SIGTERM) reach uvicorn directly, which stops its workers.
    os.execve(command[0], command, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riskva serve",
        description="Serve a registered model over HTTP: MLflow's scoring server (POST base64 images to "
        "/invocations) or, with --api openai, an OpenAI-compatible /v1/chat/completions. "
        "See the printed curl examples.",
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
                   help=f"seconds one request may take before a 504, queueing included (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="--api openai: requests that may wait for the model; more are a 503 with Retry-After "
                   f"(default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max_wait_ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                   help="--api openai: how long the first request of a batch waits for companions, up to the "
                   f"model's batch_size (default {DEFAULT_MAX_WAIT_MS:g} ms)")
    p.add_argument("--tracking_uri", default=None,
                   help=f"MLflow tracking/registry URI (default ${ENV_TRACKING_URI}, else "
                   "sqlite:///$RISKVA_HOME/mlflow/mlflow.db)")
    p.add_argument("--api", choices=APIS, default="mlflow",
                   help="mlflow: MLflow's /invocations (dataframe JSON); openai: an OpenAI-compatible "
                   "POST /v1/chat/completions with the photo as a data: URL (default mlflow)")
    p.add_argument("--max_rows", type=int, default=None,
                   help="rows (images) per /invocations request (default: the model's model_config, 64)")
    p.add_argument("--max_request_bytes", type=int, default=None,
                   help="bytes per request: the HTTP body, refused with 413 before it is read, and the images "
                   "in it (default: the model's model_config, 64 MiB)")
    p.add_argument("--max_decoded_pixels", type=int, default=None,
                   help="pixels per image, checked from its header before decoding "
                   "(default: the model's model_config, 40000000)")
    p.add_argument("--torch_dtype", default=None,
                   help="dtype the model loads in: auto | bfloat16 | float32 (default: the version's model_config "
                   "torch_dtype, auto: bf16 on a bf16 GPU; on a CPU the checkpoint's own dtype, bf16 for "
                   "Qwen2.5-VL-7B, when the CPU computes bf16, else float32)")
    p.add_argument("--no_check", dest="check_model", action="store_false",
                   help="start without first looking the model URI up in the registry")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve(ServeConfig(**vars(args)))


if __name__ == "__main__":
    raise SystemExit(main())
