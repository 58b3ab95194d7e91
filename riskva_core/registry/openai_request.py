"""What a ``POST /v1/chat/completions`` body may ask, and what it gets (openai_api.py serves it).

Every field of OpenAI's chat-completions request is honoured or refused with a 400 that names
it (``error.param``), following vLLM's OpenAI server where it honours the same field; a field
OpenAI does not define is refused too, so a typo (``max_token``) is not silently ignored.

| field                                   | here                                                          |
|-----------------------------------------|---------------------------------------------------------------|
| ``messages``                            | one ``image_url`` part (data: URL or bare base64); text parts |
|                                         | are ignored: the model writes the prompt it was trained with  |
| ``model``                               | the served name, or absent; another name is a 404 (vLLM)      |
| ``max_completion_tokens``/``max_tokens``| cap the answer (the first if both), up to the model's own     |
|                                         | ``max_new_tokens``; ``finish_reason`` ``length`` when cut     |
| ``temperature``                         | 0..2; absent or 0 is greedy (evaluation's decoding), > 0 samples |
| ``top_p``                               | (0, 1], nucleus sampling when ``temperature`` > 0             |
| ``seed``                                | with sampling: reproducible (such a request is generated alone) |
| ``stop``                                | a string or a list: the answer ends before the first one      |
| ``n``                                   | 1 only                                                        |
| ``stream``, ``stream_options``          | false / absent only (no streaming)                            |
| ``logprobs``, ``top_logprobs``          | false / absent (0) only                                       |
| ``tools``, ``tool_choice``, ``functions``, ``function_call`` | absent, empty or ``"none"`` only           |
| ``response_format``                     | absent or ``{"type": "text"}`` only                           |
| ``frequency_penalty``, ``presence_penalty``, ``logit_bias`` | absent, 0 or ``{}`` only                    |
| ``modalities``                          | absent or ``["text"]`` only                                   |
| ``audio``, ``prediction``, ``reasoning_effort``, ``web_search_options`` | absent only         |
| ``store``                               | absent or false (nothing is stored)                           |
| ``user``, ``metadata``, ``service_tier``, ``parallel_tool_calls`` | accepted, no effect                   |
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from typing import Any, Hashable

from riskva_core.errors import RiskvaError
from riskva_core.evaluate.generation import Decoding

HARMLESS = ("user", "metadata", "service_tier", "parallel_tool_calls")
# field -> the values that mean "not asked for"
ONLY_DEFAULT: dict[str, tuple] = {
    "n": (None, 1), "stream": (None, False), "stream_options": (None,), "logprobs": (None, False),
    "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False)}
WHY = {"n": "every choice would be the same photo's report; send n=1",
       "stream": "answers are sent whole", "stream_options": "answers are sent whole",
       "logprobs": "token log-probabilities are not returned",
       "top_logprobs": "token log-probabilities are not returned",
       "store": "nothing is stored"}
DECODING = ("max_completion_tokens", "max_tokens", "temperature", "top_p", "seed", "stop")
KNOWN = ("messages", "model", *DECODING, *HARMLESS, *ONLY_DEFAULT)


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


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    image: bytes
    decoding: Decoding
    model: str | None = None

    def batch_decoding(self, model_max: int | None) -> Decoding:
        """The decoding its batch runs with: the cap within the model's (None when it is the model's
        own), and no settings that have no effect (top_p and seed under greedy decoding)."""
        d = self.decoding
        cap = d.cap(model_max) if model_max else d.max_new_tokens
        return Decoding(max_new_tokens=None if model_max and cap == model_max else cap, temperature=d.temperature,
                        top_p=d.top_p if d.sampled else 1.0, seed=d.seed if d.sampled else None, stop=d.stop)

    def batch_key(self, model_max: int | None) -> Hashable:
        """Requests with equal keys share a generate batch: the same batch decoding. A seeded sampled
        request gets a key of its own, since a sampled row depends on its batch's other rows (they
        draw from one random stream): alone, its answer depends on its seed only."""
        d = self.batch_decoding(model_max)
        return d, (uuid.uuid4().hex if d.sampled and d.seed is not None else None)


def _refuse(field: str, why: str) -> RequestError:
    return RequestError(400, f"'{field}' is not supported: {why}", field, "unsupported_field")


def _number(body: dict, field: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(400, f"'{field}' must be a number in {span}, got {value!r}", field)
    return float(value)


def _integer(body: dict, field: str, low: int, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(400, f"'{field}' must be an integer in [{low}, {high}], got {value!r}", field)
    return value


def decoding(body: dict) -> Decoding:
    """The request's decoding settings (raises RequestError naming the field)."""
    for field in body:
        if field not in KNOWN:
            raise _refuse(field, "not a chat-completions field this server knows")
    for field, allowed in ONLY_DEFAULT.items():
        if field in body and body[field] not in allowed:
            raise _refuse(field, WHY.get(field, "this server writes one text report per photo") +
                          f" (allowed: {', '.join(json.dumps(a) for a in allowed)})")
    cap_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, f"'stop' must be a non-empty string or a list of them, got {body['stop']!r}", "stop")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    try:
        return Decoding(max_new_tokens=_integer(body, cap_field, 1, 2 ** 31 - 1),
                        temperature=0.0 if temperature is None else temperature,
                        top_p=1.0 if top_p is None else top_p, seed=_integer(body, "seed", 0, 2 ** 63 - 1),
                        stop=tuple(stop or ()))
    except RiskvaError as exc:  # every bound is checked above; this names what slipped through
        raise RequestError(400, str(exc)) from None


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


def parse_request(raw: bytes) -> ChatRequest:
    """The body's photo and decoding settings (raises RequestError)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object with a non-empty 'messages' list", "messages")
    settings = decoding(body)  # fields first: a refused field is named before the photo is decoded
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"'model' must be a string, got {model!r}", "model")
    return ChatRequest(request_image(body), settings, model)
