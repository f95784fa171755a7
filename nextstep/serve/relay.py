"""An HTTP request run through an ASGI app in process, its response handed back in pieces: how a Ray replica
serves the API app to the gateway (nextstep.serve.ray_serve). A whole response comes back as one HttpReply; a
stream of server-sent events as its HttpReply at once, then each chunk as the app sends it. The caller going
away (closing the generator, or cancelling it) is, to the app, its client disconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)

STREAM_TYPE = "text/event-stream"  # the responses relayed chunk by chunk
DISCONNECT_GRACE_S = 5.0  # how long an app has to finish after its client went away before it is cancelled


@dataclass
class HttpCall:
    """An HTTP request as the gateway hands it to a replica."""

    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class HttpReply:
    """The start of a response: all of it, or for a stream its status, the chunks following."""

    status: int
    content_type: str
    body: bytes  # the whole body; b"" when stream
    replica: str  # who answered (a Ray replica's actor name)
    stream: bool = False  # the body follows as chunks (bytes) of server-sent events


def scope_of(call: HttpCall) -> dict:
    """The ASGI scope of `call`, as a server would make it (ASGI spec 2.3: a stream learns of its client's
    disconnect through receive, which is how the caller going away reaches the app)."""
    path, _, query = call.path.partition("?")
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in call.headers if k.lower() != "host"]
    headers += [(b"host", b"replica"), (b"content-length", str(len(call.body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": None,
        "server": None,
    }


async def call_app(app: ASGIApp, call: HttpCall, *, replica: str) -> AsyncIterator[HttpReply | bytes]:
    """Run `app` on `call`; yields an HttpReply once the body is complete or, for a text/event-stream response,
    an HttpReply(stream=True) at once and then each chunk of the body as the app sends it. Closing or cancelling
    the generator before the end tells the app its client disconnected, and gives it DISCONNECT_GRACE_S to
    finish (a streamed job cancels itself, a waiting one answers 499) before it is cancelled."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()  # the app's messages, then None once it returned
    gone = asyncio.Event()
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.put_nowait(message)

    task = asyncio.get_running_loop().create_task(app(scope_of(call), receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))

    async def next_message() -> Message:
        message = await sent.get()
        if message is None:  # the app returned without finishing its response
            await task  # raises what the app raised
            raise RuntimeError(f"{call.method} {call.path}: the app returned without a complete response")
        return message

    try:
        start = await next_message()  # http.response.start
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}
        content_type = headers.get("content-type", "application/json")
        streamed = content_type.startswith(STREAM_TYPE)
        if streamed:
            yield HttpReply(start["status"], content_type, b"", replica, stream=True)
        body, more = [], True
        while more:
            message = await next_message()  # http.response.body
            more = message.get("more_body", False)
            chunk = message.get("body", b"")
            if not streamed:
                body.append(chunk)
            elif chunk:
                yield chunk
        if not streamed:
            yield HttpReply(start["status"], content_type, b"".join(body), replica)
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        if not task.done():
            log.warning(
                "%s %s: still running %g s after its client went away", call.method, call.path, DISCONNECT_GRACE_S
            )
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:
            log.error("%s %s failed", call.method, call.path, exc_info=task.exception())
