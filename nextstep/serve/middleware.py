"""The image server's HTTP plumbing: OpenAI-style error bodies, and ASGI middleware that caps request bodies and
counts every response, errors included, for /metrics.
"""

from __future__ import annotations

import logging
from collections import Counter

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, kind: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


class BodyLimit:
    """ASGI middleware answering 413 to bodies over `max_bytes`, by Content-Length or as they stream in."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ApiError(f"request body exceeds the limit of {self.max_bytes} bytes", status=413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await ApiError("bad Content-Length header").response()(scope, receive, send)
        if int(length) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big.response()(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class CountResponses:
    """ASGI middleware counting responses by (path, status) into `counts`; paths outside `paths` count as "other"
    (bounded keys whatever clients send). An exception no handler took becomes a JSON 500, counted too. Pure ASGI,
    not BaseHTTPMiddleware, so routes still see the client's disconnect through `receive`."""

    def __init__(self, app: ASGIApp, *, counts: Counter, paths: set[str]):
        self.app, self.counts, self.paths = app, counts, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception as e:
            log.error("unhandled error on %s", scope["path"], exc_info=e)
            if status is not None:  # the response has started: nothing more can be said
                raise
            await ApiError(f"internal error: {type(e).__name__}", status=500).response()(scope, receive, counted)
        finally:
            if status is not None:
                self.counts[(scope["path"] if scope["path"] in self.paths else "other", status)] += 1
