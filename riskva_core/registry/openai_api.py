"""An OpenAI-compatible ``POST /v1/chat/completions`` over the registered RisKVA pyfunc.

    riskva serve --api openai                      # models:/riskva@champion on 127.0.0.1:5001

Every OpenAI client (and the tooling built on them) can then call the model::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:5001/v1", api_key="unused")
    r = client.chat.completions.create(model="riskva", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,<...>"}}]}])
    r.choices[0].message.content      # the model's report text
    r.model_extra["riskva"]           # {"parsed": {风险, 风险等级, 纠正和预防建议, 缺陷描述}, "parse_ok": …}

Why a small FastAPI app over the pyfunc rather than MLflow's chat-model flavour: the chat
flavour serves a ``ChatModel`` with its own message schema and no image parts, while this
app loads the very pyfunc ``mlflow models serve`` and evaluation load, so the same
``model_config`` (generation settings, limits) and image policy answer (parity is tested).

Request fields (openai_request.py has the table): each is honoured or refused with a 400 naming
it. Decoding is greedy (evaluation's) unless ``temperature`` > 0; ``max_tokens`` caps the answer
(``finish_reason`` ``length`` when it cut it), ``stop`` ends it, ``seed`` makes sampling
reproducible; they reach the pyfunc as MLflow inference params. One photo per request, as a
``data:`` URL or bare base64; remote URLs are refused (the server fetches nothing). A body over
the model's ``max_request_bytes`` is a 413 before it is read in full (limits.py); an image over
``max_decoded_pixels`` or that cannot be decoded is a 400 naming it (the pyfunc's rule).

Under load (batching.py): concurrent requests with the same decoding settings are answered
together, up to the model's ``batch_size`` per generate batch, after waiting at most
``max_wait_ms`` (default 5 ms) for companions; each greedy photo gets the answer it gets alone
(left padding; tested). A client that hangs up is noticed at once (Starlette's ``receive``
reports ``http.disconnect``): its request leaves the queue before it reaches the model, or, if
its batch already generates, its answer is dropped. Refusals of the server itself are 5xx with
the OpenAI error shape:
- 503 + ``Retry-After`` when ``max_queue`` requests already wait (``code: server_busy``), while
  the model is loading (``model_loading``), or when the device ran out of memory
  (``out_of_memory``: retry, the server keeps serving);
- 504 when a request is not answered within ``--timeout`` seconds (``deadline_exceeded``);
- 503 ``worker_died`` when the batching worker has stopped: ``/health`` and ``/ready`` then
  answer 503 and, after ``EXIT_GRACE_S`` for the answers in flight, the process exits with
  status 70 (EX_SOFTWARE), so its supervisor (systemd, Kubernetes, uvicorn's own for
  ``--workers`` > 1) starts a fresh one instead of routing traffic to a server that never answers.

``GET /health`` is liveness: an async endpoint on the event loop, never behind the model, so it
answers at once under any load. ``GET /ready`` is 503 until the model is loaded (it loads in
the background after the server starts) and once its worker has died. ``GET /metrics`` is
Prometheus text (serving_metrics.py). Each completion carries OpenAI's ``usage`` token counts.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import Request  # at module level: FastAPI resolves the handler's string annotations here

from riskva_core.errors import RiskvaError, is_out_of_memory
from riskva_core.evaluate.generation import Decoding
from riskva_core.registry.batching import (DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS, Batcher, DeadlineExceeded,
                                           QueueFull, WorkerDied)
from riskva_core.registry.openai_request import ChatRequest, RequestError, error_body, parse_request
from riskva_core.schema import FIELDS, INPUT_COLUMN

ENV_CONFIG = "RISKVA_OPENAI_CONFIG"  # JSON handed from `riskva serve` to each uvicorn worker
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # until the model is loaded (and for a non-RisKVA pyfunc)
DEFAULT_TIMEOUT_S = 600
LOADING_RETRY_AFTER_S = 10
OOM_RETRY_AFTER_S = 5
EXIT_GRACE_S = 2.0  # after the worker died: time for in-flight requests to get their 503
EXIT_WORKER_DIED = os.EX_SOFTWARE if hasattr(os, "EX_SOFTWARE") else 70
CLIENT_CLOSED = 499  # nginx's "client closed request": the status a cancelled request is counted under
log = logging.getLogger(__name__)
# RequestError code -> the /metrics outcome and reason of a request that ended with it
OUTCOME = {"server_busy": ("refused", "server_busy"), "model_loading": ("refused", "model_loading"),
           "out_of_memory": ("failed", "out_of_memory"), "worker_died": ("failed", "worker_died"),
           "internal_error": ("failed", "error"), "deadline_exceeded": ("expired", None)}


class ClientGone(Exception):
    """The client disconnected before its answer."""


def completion(model_name: str, row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object, with the parsed report under ``riskva``."""
    usage = None
    if row.get("prompt_tokens") is not None and row.get("completion_tokens") is not None:
        prompt, done = int(row["prompt_tokens"]), int(row["completion_tokens"])
        usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "finish_reason": row.get("finish_reason") or "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": row["raw_output"]}}],
        "usage": usage,
        "riskva": {"parsed": {f: row[f] or None for f in FIELDS}, "parse_ok": bool(row["parse_ok"]),
                   "error": row.get("error") or None},
    }


def _invalid_image(message: str, row: int) -> RequestError:
    return RequestError(400, message.replace(f"row {row}", "the image", 1), "messages", "invalid_image")


def answer_batch(model: Any, images: list[bytes], decoding: Decoding | None = None) -> list[Any]:
    """One pyfunc call for a batch of photos decoded alike: per photo its output row, or the
    RequestError it would get alone. A device out-of-memory error is raised for the whole batch (503)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    params = decoding.params() if decoding is not None and decoding != Decoding() else None
    try:
        rows = model.predict(pd.DataFrame({INPUT_COLUMN: images}), params=params).to_dict("records")
    except MlflowException as exc:
        if exc.error_code == "TEMPORARILY_UNAVAILABLE":  # the pyfunc's out-of-memory refusal
            raise RequestError(503, exc.message, code="out_of_memory", retry_after=OOM_RETRY_AFTER_S) from None
        if len(images) == 1:
            return [_invalid_image(exc.message, 0)]
        # No photo of the batch answerable (or a request limit): each alone gets its own refusal.
        return [answer_batch(model, [image], decoding)[0] for image in images]
    except Exception as exc:
        if is_out_of_memory(exc):
            raise RequestError(503, f"out of memory while generating ({type(exc).__name__})",
                               code="out_of_memory", retry_after=OOM_RETRY_AFTER_S) from None
        raise
    return [_invalid_image(row["error"], i) if row.get("error") else row for i, row in enumerate(rows)]


def _model_limits(model: Any) -> dict[str, Any]:
    """What the loaded pyfunc allows: batch size, body cap, answer cap, the decoding params it takes."""
    try:
        schema = model.metadata.get_params_schema()
        names = {p.name for p in schema.params} if schema is not None else set()
    except Exception:  # noqa: BLE001 - no signature: no params
        names = set()
    limits: dict[str, Any] = {"batch_size": 1, "max_request_bytes": None, "max_new_tokens": None,
                              "params": names >= set(Decoding().params())}
    try:
        inner = model.unwrap_python_model()
    except Exception:  # noqa: BLE001 - not a python_model pyfunc
        return limits
    generator = getattr(inner, "_generator", None)
    limits.update(batch_size=int(getattr(inner, "batch_size", 1) or 1),
                  max_request_bytes=(getattr(inner, "limits", None) or {}).get("max_request_bytes"),
                  max_new_tokens=getattr(generator, "max_new_tokens", None))
    return limits


def _check_decoding(request: ChatRequest, limits: dict[str, Any]) -> None:
    """A version logged before decoding params would ignore them: refuse the field instead."""
    d, field = request.batch_decoding(limits["max_new_tokens"]), "stop"
    if limits["params"] or d == Decoding():
        return
    for name, value in (("max_tokens", d.max_new_tokens), ("temperature", d.temperature or None),
                        ("top_p", None if d.top_p == 1 else d.top_p), ("seed", d.seed)):
        if value is not None:
            field = name
            break
    raise RequestError(400, f"'{field}' is not supported by this model version (registered before per-request "
                       "decoding; register it again to use it)", field, "unsupported_field")


async def _hung_up(request: Request) -> None:
    """Returns when the client disconnects (after the body, ``receive`` waits for exactly that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(load: Callable[[], Any], model_name: str, max_request_bytes: int | None = None, *,
               timeout_s: float = DEFAULT_TIMEOUT_S, max_queue: int = DEFAULT_MAX_QUEUE,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, tracing: Any = None, identity: tuple | None = None):
    """The FastAPI app (wrapped in the body limit) around the pyfunc that ``load()`` returns
    (``mlflow.pyfunc.load_model``); it loads in a background thread once the server starts. The body
    limit is ``max_request_bytes`` until then, and the loaded model's own ``max_request_bytes`` after.
    ``tracing`` (a ``tracing.TracingConfig``, or None for none): each answered request is traced off
    the request path, as ``identity`` = (model name, version, alias); lost traces count in /metrics."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    from riskva_core.registry.limits import BodyLimit
    from riskva_core.registry.serving_metrics import ServingMetrics
    from riskva_core.registry.tracing import record_row, start_tracer

    state: dict[str, Any] = {"batcher": None, "error": None, "limits": None, "died": False, "loop": None}

    def is_ready() -> bool:
        return state["batcher"] is not None and state["batcher"].alive()

    metrics = ServingMetrics(queue_depth=lambda: state["batcher"].depth() if state["batcher"] else 0, ready=is_ready)
    tracer = start_tracer(tracing, metrics.trace_gaps)
    identity = identity or (model_name, "unknown", None)

    async def exit_soon() -> None:
        await asyncio.sleep(EXIT_GRACE_S)
        log.critical("exiting with status %d so that a supervisor starts a fresh server", EXIT_WORKER_DIED)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown; the lifespan then exits non-zero

    def worker_died(exc: BaseException) -> None:  # on the worker thread
        state["died"], state["error"] = True, f"the batching worker died ({type(exc).__name__}: {exc})"
        if state["loop"] is not None:
            state["loop"].call_soon_threadsafe(schedule_exit)

    def schedule_exit() -> None:  # on the event loop
        if "exit" not in state:
            state["exit"] = asyncio.ensure_future(exit_soon())

    def load_in_background() -> None:
        try:
            model = load()
            limits = _model_limits(model)
            if limits["max_request_bytes"]:
                body_limit.max_bytes = int(limits["max_request_bytes"])  # the one limit: the model's own
            state["limits"] = limits
            state["batcher"] = Batcher(lambda images, key: answer_batch(model, images, key[0]),
                                       max_batch=limits["batch_size"], max_wait_s=max_wait_ms / 1000,
                                       max_queue=max_queue, max_batch_bytes=limits["max_request_bytes"],
                                       on_batch=metrics.observe_batch, on_death=worker_died).start()
            log.info("model loaded: batches of up to %d, queue of %d, body limit %d bytes", limits["batch_size"],
                     max_queue, body_limit.max_bytes)
        except Exception as exc:  # noqa: BLE001 - /health reports it; the supervisor restarts us
            state["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state["loop"] = asyncio.get_running_loop()
        threading.Thread(target=load_in_background, name="riskva-load", daemon=True).start()
        yield
        if state["batcher"] is not None:
            state["batcher"].stop()
        if tracer is not None:
            tracer.close(5)  # what is queued gets 5 s; the rest is lost (the answers went out)
        if state["died"]:  # uvicorn itself would exit 0 after a SIGTERM: the status must say we failed
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_WORKER_DIED)

    app = FastAPI(title="RisKVA (OpenAI-compatible)", docs_url=None, redoc_url=None, lifespan=lifespan)

    # async endpoints run on the event loop, never in the worker pool the model work uses
    @app.get("/health")
    @app.get("/ping")
    async def health():
        if state["error"]:
            return JSONResponse(status_code=503, content={"status": "error", "error": state["error"]})
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok = is_ready()
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "error": state["error"]})

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(content=data, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "riskva"}]}

    async def answer(request: Request, start: float, started_ns: int) -> dict[str, Any]:
        batcher, limits = state["batcher"], state["limits"]
        if state["died"]:
            raise RequestError(503, state["error"], code="worker_died")
        if batcher is None:
            raise RequestError(503, "the model is still loading (see /ready)", code="model_loading",
                               retry_after=LOADING_RETRY_AFTER_S)
        chat = await run_in_threadpool(parse_request, await request.body())  # JSON, base64 off the loop
        if chat.model is not None and chat.model != model_name:  # as vLLM: a name it does not serve is a 404
            raise RequestError(404, f"The model `{chat.model}` does not exist (this server serves `{model_name}`)",
                               "model", "model_not_found")
        _check_decoding(chat, limits)
        deadline = start + timeout_s
        try:
            future = batcher.submit(chat.image, deadline=deadline, size=len(chat.image),
                                    key=chat.batch_key(limits["max_new_tokens"]))
        except QueueFull as exc:
            raise RequestError(503, str(exc), code="server_busy", retry_after=exc.retry_after) from None
        except WorkerDied as exc:
            raise RequestError(503, str(exc), code="worker_died") from None
        waiting = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_hung_up(request))
        try:
            done, _ = await asyncio.wait({waiting, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting not in done:
            # Leaves the queue now (the batcher's done-callback); inside a running batch, its answer is dropped.
            waiting.cancel()
            if gone in done:
                raise ClientGone()
            raise RequestError(504, f"no answer within the deadline of {timeout_s:g} s (--timeout)",
                               code="deadline_exceeded")
        try:
            row = waiting.result()
        except DeadlineExceeded:
            raise RequestError(504, f"no answer within the deadline of {timeout_s:g} s (--timeout)",
                               code="deadline_exceeded") from None
        except WorkerDied as exc:
            raise RequestError(503, str(exc), code="worker_died") from None
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug, not the client's: a 500 in the OpenAI shape, logged
            log.exception("answering a request failed")
            raise RequestError(500, f"the server failed to answer ({type(exc).__name__})", code="internal_error") \
                from None
        record_row(tracer, row, chat.image, identity, started_ns, time.monotonic() - start, "openai")
        return completion(model_name, row)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        start, started_ns = time.monotonic(), time.time_ns()
        metrics.observe_received()
        reason = None
        try:
            response: Any = await answer(request, start, started_ns)
            status, outcome = 200, "answered"
        except (ClientGone, ClientDisconnect):
            response = Response(status_code=CLIENT_CLOSED)  # nobody reads it; uvicorn drops it
            status, outcome = CLIENT_CLOSED, "cancelled"
        except RequestError as exc:
            response, status = exc.response(), exc.status
            outcome, reason = OUTCOME.get(exc.code or "", ("refused", "invalid_request"))
        metrics.observe_request(outcome, status, time.monotonic() - start, reason)
        return response

    def refused(message: str) -> dict:
        metrics.observe_received()
        metrics.observe_request("refused", 413, 0.0, "too_large")
        return error_body(message, 413, code="request_too_large")

    body_limit = BodyLimit(app, max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, refused)
    return body_limit


def app_from_env():
    """uvicorn factory: serve the model named in ``$RISKVA_OPENAI_CONFIG`` (set by ``riskva serve``)."""
    import mlflow

    from riskva_core.registry.tracing import TracingConfig, model_identity

    try:
        config = json.loads(os.environ[ENV_CONFIG])
    except (KeyError, json.JSONDecodeError) as exc:
        raise RiskvaError(f"${ENV_CONFIG} must hold the server config as JSON ({exc})") from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    def load():
        return mlflow.pyfunc.load_model(config["model_uri"], model_config=config.get("model_config") or None)

    return create_app(load, config.get("model_name") or "riskva", config.get("max_request_bytes"),
                      timeout_s=float(config.get("timeout_s") or DEFAULT_TIMEOUT_S),
                      max_queue=int(config.get("max_queue") or DEFAULT_MAX_QUEUE),
                      max_wait_ms=float(config.get("max_wait_ms", DEFAULT_MAX_WAIT_MS)),
                      tracing=TracingConfig.from_env(),
                      identity=model_identity(config.get("served_uri") or config["model_uri"], config.get("model_version")))
