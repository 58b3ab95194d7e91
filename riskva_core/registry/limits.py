"""Body limits in front of both servers, before any byte is parsed.

``BodyLimit`` is an ASGI middleware: a request whose ``Content-Length`` is over the limit is
answered 413 at once, without reading its body (the connection is then closed); a body sent
without a length (chunked) is counted as it arrives and refused as soon as it passes the
limit. Only a body within the limit reaches the app, which then reads it from memory.

MLflow's scoring server reads and parses the whole body before the pyfunc can count its
bytes, so ``riskva serve`` runs MLflow's own FastAPI app (``scoring_server.init``) wrapped in
this middleware (scoring_app.py) rather than ``mlflow models serve``: same app, same process,
the limit in front.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

def mlflow_error_body(message: str) -> dict[str, Any]:
    """MLflow's scoring-server error shape (what its own 400s look like)."""
    return {"error_code": "INVALID_PARAMETER_VALUE", "message": message}


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413; ``error_body(message)`` shapes the JSON."""

    def __init__(self, app: Any, max_bytes: int, error_body: Callable[[str], dict[str, Any]] = mlflow_error_body,
                 what: str = "max_request_bytes"):
        self.app, self.max_bytes, self.error_body, self.what = app, int(max_bytes), error_body, what

    def __getattr__(self, name: str) -> Any:  # app.state, app.routes… stay reachable (tests, uvicorn)
        return getattr(self.app, name)

    async def _refuse(self, send: Callable[[dict], Awaitable[None]], message: str) -> None:
        body = json.dumps(self.error_body(message), ensure_ascii=False).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, f"request body is {int(length)} bytes, over the limit of "
                                      f"{self.max_bytes} ({self.what})")
        messages: list[dict] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away; the app sees the disconnect
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                return await self._refuse(send, f"request body is over the limit of {self.max_bytes} bytes "
                                          f"({self.what})")
            if not message.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
