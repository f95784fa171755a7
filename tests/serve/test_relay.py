"""The API app run in process through relay.call_app, as a Ray replica runs it: whole replies and errors as the
app answers them, a stream handed back event by event before it ends, and the caller leaving as a disconnect."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from nextstep.serve.api import ServeConfig, build_app  # noqa: E402
from nextstep.serve.relay import HttpCall, HttpReply, call_app  # noqa: E402
from tests.serve.test_api import GEN, model_dir, pipe  # noqa: E402, F401
from tests.test_hostile import counting  # noqa: E402

JSON = [("content-type", "application/json")]


def post(body: dict) -> HttpCall:
    return HttpCall("POST", GEN, JSON, json.dumps(body).encode())


async def served(app, scenario):
    """Run `scenario(app)` with the app's lifespan (its batcher) running."""
    async with app.router.lifespan_context(app):
        return await scenario(app)


async def pieces(app, call: HttpCall) -> list:
    return [piece async for piece in call_app(app, call, replica="r1")]


def test_whole_replies_and_errors_come_back_as_the_app_answers_them(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(model_name="tiny", max_wait_ms=0, max_steps=8, default_size=(32, 32)))

    async def scenario(app):
        image = await pieces(app, post({"prompt": "a red circle", "seed": 1, "steps": 2}))
        bad = await pieces(app, post({"prompt": "a", "n": 99}))
        query = await pieces(app, HttpCall("GET", "/v1/models?x=1", [], b""))
        return image, bad, query

    image, bad, query = asyncio.run(served(app, scenario))
    assert len(image) == 1 and isinstance(image[0], HttpReply) and not image[0].stream
    assert (image[0].status, image[0].content_type, image[0].replica) == (200, "application/json", "r1")
    assert json.loads(image[0].body)["seed"] == 1 and len(json.loads(image[0].body)["data"]) == 1
    assert bad[0].status == 400 and json.loads(bad[0].body)["error"]["param"] == "n"
    assert json.loads(query[0].body)["data"][0]["id"] == "tiny"


def test_a_stream_comes_back_event_by_event_and_ends_with_the_plain_image(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(max_wait_ms=0, max_steps=8))
    body = {"prompt": "a blue star", "seed": 4, "size": "64x64", "steps": 2}

    async def scenario(app):
        arrived = []  # (piece, whether the generation was still running when it came)
        async for piece in call_app(app, post({**body, "stream": True, "partial_images": 3}), replica="r1"):
            arrived.append((piece, app.state.server.streams.completed == 0))
        return arrived, await pieces(app, post(body))

    arrived, plain = asyncio.run(served(app, scenario))
    head, chunks = arrived[0][0], [piece for piece, _ in arrived[1:]]
    assert head.stream and head.status == 200 and head.content_type.startswith("text/event-stream")
    assert all(isinstance(c, bytes) for c in chunks) and all(early for _, early in arrived[:-1])
    events = [json.loads(e.split("\ndata: ")[1]) for e in b"".join(chunks).decode().split("\n\n")[:-1]]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert events[-1]["b64_json"] == json.loads(plain[0].body)["data"][0]["b64_json"]


def test_the_caller_leaving_mid_stream_is_a_disconnect_that_stops_the_generation(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(max_wait_ms=0))
    calls = counting(app.state.server, delay=0.05)  # 256 tokens: >= 12.8 s
    body = {"prompt": "abandoned", "size": "256x256", "steps": 1, "stream": True, "partial_images": 3}

    async def scenario(app):
        replies = call_app(app, post(body), replica="r1")
        assert (await anext(replies)).stream
        assert (await anext(replies)).startswith(b"event: image_generation.partial_image")
        start = time.monotonic()
        await replies.aclose()  # as when Ray cancels the replica's call
        closed_s = time.monotonic() - start
        for _ in range(100):  # the batch stops at its next token
            await asyncio.sleep(0.05)
            if app.state.server.batcher.stats.cancelled:
                break
        return closed_s, len(calls)

    closed_s, ran = asyncio.run(served(app, scenario))
    server = app.state.server
    assert closed_s < 2 and server.streams.disconnected == 1 and server.streams.completed == 0
    assert server.batcher.stats.cancelled == 1 and ran < 256 * 3 // 4, ran
