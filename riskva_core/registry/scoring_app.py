"""MLflow's scoring server (``POST /invocations``) with the body limit in front: what ``riskva serve``
runs for ``--api mlflow``.

The app is MLflow's own (``mlflow.pyfunc.scoring_server.init``, the app ``mlflow models serve``
starts under uvicorn), so requests, responses and errors are MLflow's. Two things are added:
- ``limits.BodyLimit`` in front, so a body over the cap is a 413 from its ``Content-Length`` (or
  as soon as a chunked body passes it) instead of after MLflow has read and parsed it all. The cap
  is the model's ``max_request_bytes`` (the OpenAI server's cap too): the body, base64 and JSON
  included, so the images in an admitted body are always within the pyfunc's own limit;
- concurrency on one model copy is guarded in the pyfunc itself (a lock around generation,
  pyfunc.py), not here: an ``/invocations`` request already carries its own batch of rows, and
  a guard keeps evaluation and every other caller of the pyfunc safe too;
- in front of both, ``scoring_traces.TraceInvocations``: one MLflow trace per answered photo row,
  written after the answer is sent and off the event loop (tracing.py), and ``GET /metrics`` with
  the count of traces lost (``riskva_trace_gaps_total{reason}``).
"""
from __future__ import annotations

import json
import os
from typing import Any

from riskva_core.errors import RiskvaError

ENV_CONFIG = "RISKVA_SCORING_CONFIG"  # JSON handed from `riskva serve` to each uvicorn worker


def body_limit(model: Any) -> int:
    from riskva_core.registry.pyfunc import DEFAULT_MAX_REQUEST_BYTES

    try:
        limits = getattr(model.unwrap_python_model(), "limits", None) or {}
    except Exception:  # noqa: BLE001 - not a python_model pyfunc: the default cap
        limits = {}
    return int(limits.get("max_request_bytes") or DEFAULT_MAX_REQUEST_BYTES)


def create_app(model: Any, max_body_bytes: int | None = None, tracing: Any = None, identity: tuple | None = None):
    """MLflow's scoring app for a loaded pyfunc, behind the body limit, with tracing in front
    (``tracing``: a ``tracing.TracingConfig``, None for none)."""
    from mlflow.pyfunc import scoring_server
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from riskva_core.registry.limits import BodyLimit
    from riskva_core.registry.scoring_traces import TraceInvocations
    from riskva_core.registry.tracing import gap_counter, start_tracer

    registry = CollectorRegistry()
    tracer = start_tracer(tracing, gap_counter(registry))
    limited = BodyLimit(scoring_server.init(model), max_body_bytes or body_limit(model))
    return TraceInvocations(limited, tracer, identity or ("riskva", "unknown", None),
                            lambda: (generate_latest(registry), CONTENT_TYPE_LATEST))


def app_from_env():
    """uvicorn factory: load the model named in ``$RISKVA_SCORING_CONFIG`` as MLflow's server does
    (``MLFLOW_PYFUNC_INFERENCE_CONFIG`` overrides its model_config)."""
    from mlflow.pyfunc import scoring_server

    from riskva_core.registry.tracing import TracingConfig, model_identity

    try:
        config = json.loads(os.environ[ENV_CONFIG])
    except (KeyError, json.JSONDecodeError) as exc:
        raise RiskvaError(f"${ENV_CONFIG} must hold the server config as JSON ({exc})") from None
    identity = model_identity(config.get("served_uri") or config["model_uri"], config.get("model_version"))
    return create_app(scoring_server.load_model_with_mlflow_config(config["model_uri"]),
                      tracing=TracingConfig.from_env(), identity=identity)
