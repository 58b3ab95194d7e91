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

Request rules (each refusal is an OpenAI-shaped error body, ``{"error": {"message", "type",
"param", "code"}}``, with a 4xx status):
- one photo per request, as an ``image_url`` part whose ``url`` is a ``data:image/...;base64,``
  URL or bare base64; remote URLs are refused (the server fetches nothing);
- the model writes its own prompt (the one it was trained with): text parts are ignored,
  and so are sampling settings (decoding is greedy, as in evaluation); ``n`` must be 1 and
  ``stream`` false;
- a body over ``max_request_bytes`` is a 413 before it is read in full (limits.py); an image
  over ``max_decoded_pixels`` or that cannot be decoded is a 400 naming it (the pyfunc's rule).

Under load (batching.py): concurrent requests are answered together, up to the model's
``batch_size`` per generate batch, after waiting at most ``max_wait_ms`` (default 5 ms) for
companions; each photo gets the answer it gets alone (greedy decoding, left padding; tested).
Refusals of the server itself are 5xx with the OpenAI error shape:
- 503 + ``Retry-After`` when ``max_queue`` requests already wait (``code: server_busy``), while
  the model is loading (``model_loading``), or when the device ran out of memory
  (``out_of_memory``: retry, the server keeps serving);
- 504 when a request is not answered within ``--timeout`` seconds (``deadline_exceeded``).

``GET /health`` is liveness: an async endpoint on the event loop, never behind the model, so it
answers at once under any load. ``GET /ready`` is 503 until the model is loaded (it loads in
the background after the server starts). ``GET /metrics`` is Prometheus text
(serving_metrics.py). Each completion carries OpenAI's ``usage`` token counts.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import Request  # at module level: FastAPI resolves the handler's string annotations here

from riskva_core.errors import RiskvaError, is_out_of_memory
from riskva_core.registry.batching import DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS, Batcher, DeadlineExceeded, QueueFull
from riskva_core.schema import FIELDS, INPUT_COLUMN

ENV_CONFIG = "RISKVA_OPENAI_CONFIG"  # JSON handed from `riskva serve` to each uvicorn worker
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 600
LOADING_RETRY_AFTER_S = 10
OOM_RETRY_AFTER_S = 5
log = logging.getLogger(__name__)


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def response(self):
        from fastapi.responses import JSONResponse

        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(status_code=self.status, headers=headers,
                            content=error_body(self.message, self.status, self.param, self.code))


def _image_bytes(url: str, where: str) -> bytes:
    value = url.strip()
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(400, f"{where}: a data: URL must be base64 (data:image/jpeg;base64,...)", where)
    elif value.startswith(("http://", "https://", "file:", "ftp:")):
        raise RequestError(400, f"{where}: remote image URLs are not fetched; send the photo as a data: URL",
                           where, "unsupported_image_url")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: image is not valid base64", where) from None


def request_image(body: Any) -> bytes:
    """The one photo of a chat-completions request body (raises RequestError)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise RequestError(400, "body must be a JSON object with a non-empty 'messages' list", "messages")
    if body.get("stream"):
        raise RequestError(400, "stream=true is not supported", "stream")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "n must be 1: decoding is greedy, every choice would be the same", "n")
    images: list[bytes] = []
    for m, message in enumerate(body["messages"]):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue  # a plain-text message (system, user) carries no image
        for p, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            where = f"messages[{m}].content[{p}]"
            if not isinstance(url, str):
                raise RequestError(400, f"{where}: image_url needs a 'url' string", where)
            images.append(_image_bytes(url, where))
    if len(images) != 1:
        raise RequestError(400, f"a request answers one photo; it carries {len(images)} image_url parts", "messages")
    return images[0]


def parse_request(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON body and its one photo (raises RequestError)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON ({exc})") from None
    return body, request_image(body)


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
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": row["raw_output"]}}],
        "usage": usage,
        "riskva": {"parsed": {f: row[f] or None for f in FIELDS}, "parse_ok": bool(row["parse_ok"]),
                   "error": row.get("error") or None},
    }


def _invalid_image(message: str, row: int) -> RequestError:
    return RequestError(400, message.replace(f"row {row}", "the image", 1), "messages", "invalid_image")


def answer_batch(model: Any, images: list[bytes]) -> list[Any]:
    """One pyfunc call for a batch of photos: per photo its output row, or the RequestError it
    would get alone. A device out-of-memory error is raised for the whole batch (503)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        rows = model.predict(pd.DataFrame({INPUT_COLUMN: images})).to_dict("records")
    except MlflowException as exc:
        if exc.error_code == "TEMPORARILY_UNAVAILABLE":  # the pyfunc's out-of-memory refusal
            raise RequestError(503, exc.message, code="out_of_memory", retry_after=OOM_RETRY_AFTER_S) from None
        if len(images) == 1:
            return [_invalid_image(exc.message, 0)]
        # No photo of the batch answerable (or a request limit): each alone gets its own refusal.
        return [answer_batch(model, [image])[0] for image in images]
    except Exception as exc:
        if is_out_of_memory(exc):
            raise RequestError(503, f"out of memory while generating ({type(exc).__name__})",
                               code="out_of_memory", retry_after=OOM_RETRY_AFTER_S) from None
        raise
    return [_invalid_image(row["error"], i) if row.get("error") else row for i, row in enumerate(rows)]


def _model_limits(model: Any) -> tuple[int, int | None]:
    """(batch_size, max_request_bytes) of a RisKVA pyfunc; (1, None) for another model."""
    try:
        inner = model.unwrap_python_model()
    except Exception:  # noqa: BLE001 - not a python_model pyfunc
        return 1, None
    limits = getattr(inner, "limits", None) or {}
    return int(getattr(inner, "batch_size", 1) or 1), limits.get("max_request_bytes")


def create_app(load: Callable[[], Any], model_name: str, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, *,
               timeout_s: float = DEFAULT_TIMEOUT_S, max_queue: int = DEFAULT_MAX_QUEUE,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
    """The FastAPI app (wrapped in the body limit) around the pyfunc that ``load()`` returns
    (``mlflow.pyfunc.load_model``); it loads in a background thread once the server starts."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from riskva_core.registry.limits import BodyLimit
    from riskva_core.registry.serving_metrics import ServingMetrics

    state: dict[str, Any] = {"batcher": None, "error": None}
    metrics = ServingMetrics(queue_depth=lambda: state["batcher"].depth() if state["batcher"] else 0,
                             ready=lambda: state["batcher"] is not None)

    def load_in_background() -> None:
        try:
            model = load()
            batch_size, batch_bytes = _model_limits(model)
            state["batcher"] = Batcher(lambda images: answer_batch(model, images), max_batch=batch_size,
                                       max_wait_s=max_wait_ms / 1000, max_queue=max_queue,
                                       max_batch_bytes=batch_bytes, on_batch=metrics.observe_batch).start()
            log.info("model loaded: batches of up to %d, queue of %d", batch_size, max_queue)
        except Exception as exc:  # noqa: BLE001 - /health reports it; the supervisor restarts us
            state["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=load_in_background, name="riskva-load", daemon=True).start()
        yield
        if state["batcher"] is not None:
            state["batcher"].stop()

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
        ok = state["batcher"] is not None
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "error": state["error"]})

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(content=data, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "riskva"}]}

    async def answer(request: Request, start: float) -> dict[str, Any]:
        batcher = state["batcher"]
        if batcher is None:
            raise RequestError(503, "the model is still loading (see /ready)", code="model_loading",
                               retry_after=LOADING_RETRY_AFTER_S)
        body, image = await run_in_threadpool(parse_request, await request.body())  # JSON, base64 off the loop
        deadline = start + timeout_s
        try:
            future = batcher.submit(image, deadline=deadline, size=len(image))
        except QueueFull as exc:
            raise RequestError(503, str(exc), code="server_busy", retry_after=exc.retry_after) from None
        waiting = asyncio.wrap_future(future)
        try:
            row = await asyncio.wait_for(waiting, timeout=max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise RequestError(504, f"no answer within the deadline of {timeout_s:g} s (--timeout)",
                               code="deadline_exceeded") from None
        return completion(str(body.get("model") or model_name), row)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        start = time.monotonic()
        try:
            response: Any = await answer(request, start)
            status = 200
        except RequestError as exc:
            response, status = exc.response(), exc.status
        metrics.observe_request(status, time.monotonic() - start)
        return response

    def refused(message: str) -> dict:
        metrics.observe_request(413, 0.0)
        return error_body(message, 413, code="request_too_large")

    return BodyLimit(app, max_request_bytes, refused)


def app_from_env():
    """uvicorn factory: serve the model named in ``$RISKVA_OPENAI_CONFIG`` (set by ``riskva serve``)."""
    import mlflow

    try:
        config = json.loads(os.environ[ENV_CONFIG])
    except (KeyError, json.JSONDecodeError) as exc:
        raise RiskvaError(f"${ENV_CONFIG} must hold the server config as JSON ({exc})") from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    def load():
        return mlflow.pyfunc.load_model(config["model_uri"], model_config=config.get("model_config") or None)

    return create_app(load, config.get("model_name") or "riskva", int(config["max_request_bytes"]),
                      timeout_s=float(config.get("timeout_s") or DEFAULT_TIMEOUT_S),
                      max_queue=int(config.get("max_queue") or DEFAULT_MAX_QUEUE),
                      max_wait_ms=float(config.get("max_wait_ms", DEFAULT_MAX_WAIT_MS)))
