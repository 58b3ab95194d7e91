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
- a body over ``max_request_bytes`` is a 413 before it is read in full; an image over
  ``max_decoded_pixels`` or that cannot be decoded is a 400 naming it (the pyfunc's rule).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import time
import uuid
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handler's string annotations here

from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS, INPUT_COLUMN

ENV_CONFIG = "RISKVA_OPENAI_CONFIG"  # JSON handed from `riskva serve` to each uvicorn worker
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": kind, "param": param, "code": code}})


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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


def completion(model_name: str, row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object, with the parsed report under ``riskva``."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": row["raw_output"]}}],
        "riskva": {"parsed": {f: row[f] or None for f in FIELDS}, "parse_ok": bool(row["parse_ok"]),
                   "error": row.get("error") or None},
    }


def create_app(model: Any, model_name: str, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """The FastAPI app around a loaded pyfunc (``mlflow.pyfunc.load_model``)."""
    import pandas as pd
    from fastapi import FastAPI
    from mlflow.exceptions import MlflowException
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="RisKVA (OpenAI-compatible)", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one generate at a time: the model's memory, not the GIL, is the limit

    def answer(image: bytes) -> dict[str, Any]:
        with lock:
            return model.predict(pd.DataFrame({INPUT_COLUMN: [image]})).to_dict("records")[0]

    @app.get("/health")
    @app.get("/ping")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "riskva"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_request_bytes:
                raise RequestError(413, f"request body is {length} bytes, over the limit of {max_request_bytes} "
                                   "(max_request_bytes)", code="request_too_large")
            raw = bytearray()
            async for chunk in request.stream():  # chunked bodies are capped as they arrive
                raw += chunk
                if len(raw) > max_request_bytes:
                    raise RequestError(413, f"request body is over the limit of {max_request_bytes} bytes "
                                       "(max_request_bytes)", code="request_too_large")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"body is not valid JSON ({exc})") from None
            image = request_image(body)
            try:
                row = await run_in_threadpool(answer, image)
            except MlflowException as exc:  # the pyfunc's 400: the image cannot be used
                raise RequestError(400, exc.message.replace("row 0", "the image", 1), "messages",
                                   "invalid_image") from None
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.param, exc.code)
        return completion(str(body.get("model") or model_name), row)

    return app


def app_from_env():
    """uvicorn factory: load the model named in ``$RISKVA_OPENAI_CONFIG`` (set by ``riskva serve``)."""
    import mlflow

    try:
        config = json.loads(os.environ[ENV_CONFIG])
    except (KeyError, json.JSONDecodeError) as exc:
        raise RiskvaError(f"${ENV_CONFIG} must hold the server config as JSON ({exc})") from None
    model = mlflow.pyfunc.load_model(config["model_uri"], model_config=config.get("model_config") or None)
    return create_app(model, config.get("model_name") or "riskva", int(config["max_request_bytes"]))
