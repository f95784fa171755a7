"""Streamed partial images (stream=true): OpenAI's event shapes, partial images of the right size and count, the
final image equal to the non-streamed one, errors before and during the stream, and cancellation on disconnect."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from nextstep.serve.api import ServeConfig, build_app  # noqa: E402
from nextstep.serve.stream import partial_rows  # noqa: E402
from tests.serve.test_api import GEN, alone, decode, model_dir, pipe, pixels, png, running  # noqa: E402, F401
from tests.test_hostile import counting, wait_until  # noqa: E402

EDIT = "/v1/images/edits"
SMALL = {"size": "64x32", "steps": 2}  # (with 16 px tokens) a grid of 2 rows of 4 tokens; 8 px tokens: 4 rows


@pytest.fixture(scope="module")
def client(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(model_name="tiny", max_wait_ms=300, max_steps=8, default_size=(32, 32)))
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def read_events(response) -> list[tuple[str, dict]]:
    """Server-sent events as (event, data); each has exactly an `event:` and a `data:` line."""
    events = []
    for block in response.text.split("\n\n")[:-1]:
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block
        events.append((lines["event"], json.loads(lines["data"])))
    assert response.text.endswith("\n\n")
    return events


def grid_rows(pipe, height: int) -> int:  # noqa: F811
    return height // pipe.down_factor


def test_partial_rows_spread_evenly_and_leave_out_the_final_row():
    assert partial_rows(8, 1) == (4,) and partial_rows(8, 3) == (2, 4, 6) and partial_rows(8, 0) == ()
    assert partial_rows(2, 3) == (1,) and partial_rows(1, 3) == ()


def test_stream_sends_partial_images_then_the_non_streamed_image(client, pipe, alone):  # noqa: F811
    body = {"prompt": "a red circle", "seed": 7, "n": 2, "stream": True, "partial_images": 3, **SMALL}
    r = client.post(GEN, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = read_events(r)
    for name, data in events:
        assert data["type"] == name and data["size"] == "64x32" and data["output_format"] == "png"
        assert isinstance(data["created_at"], int)
    partials = [data for name, data in events if name == "image_generation.partial_image"]
    completed = [data for name, data in events if name == "image_generation.completed"]
    assert [name for name, _ in events] == ["image_generation.partial_image"] * len(partials) + [
        "image_generation.completed"
    ] * 2
    count = len(partial_rows(grid_rows(pipe, 32), 3))  # the grid has too few rows for 3 partial images
    assert count >= 1 and len(partials) == 2 * count
    assert [(p["partial_image_index"], p["image_index"]) for p in partials] == [
        (i, j) for i in range(count) for j in range(2)
    ]
    assert all(decode(p).size == (64, 32) for p in partials)
    assert [c["image_index"] for c in completed] == [0, 1] and completed[0]["seed"] == 7
    want = alone.generate("a red circle", size=(32, 64), steps=2, n=2, seed=7)
    for got, expected in zip(completed, want, strict=True):
        assert np.array_equal(pixels(decode(got)), pixels(expected)), "the streamed final image is the plain one"
    assert np.abs(pixels(decode(partials[0])) - pixels(want[0])).max() > 0  # a partial image is not the final one
    plain = client.post(GEN, json={k: v for k, v in body.items() if k not in ("stream", "partial_images")})
    assert [c["b64_json"] for c in completed] == [d["b64_json"] for d in plain.json()["data"]]
    streams = client.get("/metrics").json()["streams"]
    assert streams["completed"] >= 1 and streams["partial_images"] >= 2 * count


def test_the_official_openai_client_reads_the_streams(client):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    events = list(
        api.images.generate(prompt="a cat", size="64x32", stream=True, partial_images=1, extra_body={"steps": 2})
    )
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[0].partial_image_index == 0 and decode(events[1].model_dump()).size == (64, 32)
    source = io.BytesIO(png((64, 32)))
    source.name = "in.png"
    events = list(api.images.edit(image=source, prompt="make it blue", stream=True, extra_body={"steps": 2}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]  # default: 1 partial
    assert decode(events[1].model_dump()).size == (64, 32)


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"partial_images": 4}, "partial_images", "partial_images must be from 0 to 3, got 4"),
        ({"size": "1000x1000"}, "size", "size '1000x1000' is not supported"),
        ({"stream": False, "partial_images": 2}, "partial_images", "partial_images is for streaming"),
        ({"stream": "yes please"}, "stream", "stream: Input should be a valid boolean"),
    ],
)
def test_bad_stream_requests_get_json_4xx_before_any_event(client, body, param, message):
    r = client.post(GEN, json={"prompt": "a cat", "stream": True, **body})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == param


def test_with_partial_images_zero_the_stream_is_the_final_image_alone(client):
    r = client.post(GEN, json={"prompt": "a cat", "stream": True, "partial_images": 0, **SMALL})
    assert [name for name, _ in read_events(r)] == ["image_generation.completed"]


def test_a_batch_routes_each_streams_partial_images_to_it(client, pipe):  # noqa: F811
    """Two streams with different prompts and a plain request share one batch; each stream gets its own rows."""
    bodies = [{"prompt": p, "seed": 3, "stream": True, "partial_images": 3, **SMALL} for p in ("a red cat", "a dog")]
    before = client.get("/metrics").json()["batch_requests"].get("3", 0)
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(client.post, GEN, json=b) for b in bodies]
        plain = pool.submit(client.post, GEN, json={"prompt": "plain", **SMALL})
        results = [read_events(s.result()) for s in streams]
        assert plain.result().status_code == 200
    assert client.get("/metrics").json()["batch_requests"].get("3", 0) == before + 1
    for body, events in zip(bodies, results, strict=True):
        partials = [decode(d) for name, d in events if name.endswith("partial_image")]
        assert len(partials) == len(partial_rows(grid_rows(pipe, 32), 3))
        lone = read_events(client.post(GEN, json=body))  # the same request alone
        lone_partials = [decode(d) for name, d in lone if name.endswith("partial_image")]
        for got, want in zip(partials, lone_partials, strict=True):  # batch shape: float rounding only
            assert np.abs(pixels(got) - pixels(want)).mean() < 0.5


def test_a_failure_mid_stream_ends_it_with_an_error_event(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(max_wait_ms=0))
    real = app.state.server.batcher.run

    def failing(jobs, on_token):
        def hook(k, tokens):
            if k == 40:
                raise RuntimeError("the device fell over")
            on_token(k, tokens)

        return real(jobs, hook)

    app.state.server.batcher.run = failing
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = {"prompt": "doomed", "size": "128x128", "steps": 1, "stream": True, "partial_images": 3}
        events = read_events(c.post(GEN, json=body))
        assert [name for name, _ in events][:-1] == ["image_generation.partial_image"] * (len(events) - 1)
        assert len(events) >= 2  # a partial image came before the failure
        name, data = events[-1]
        assert name == "error" and data["type"] == "error"
        assert data["error"]["message"] == "image generation failed: RuntimeError"
        assert data["error"]["type"] == "server_error"
        assert c.get("/metrics").json()["streams"]["failed"] == 1


def test_a_client_leaving_mid_stream_stops_its_generation(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(max_wait_ms=0))
    calls = counting(app.state.server, delay=0.05)  # 256 tokens: >= 12.8 s
    total = grid_rows(pipe, 256) ** 2
    body = {"prompt": "abandoned", "size": "256x256", "steps": 1, "stream": True, "partial_images": 3}
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with httpx.stream("POST", url + GEN, json=body, timeout=60) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())  # the first partial image is on its way
            assert first == "event: image_generation.partial_image"
        # the connection is closed here, the stream half read
        assert wait_until(lambda: c.get("/metrics").json()["cancelled"] == 1, timeout=10) < 5
        ran = len(calls)
        assert ran < total * 3 // 4, f"{ran} of {total} tokens ran for a client that had gone"
        metrics = c.get("/metrics").json()
        assert metrics["streams"]["disconnected"] == 1 and metrics["streams"]["completed"] == 0
        assert {"path": GEN, "status": 200, "count": 1} in metrics["responses"]  # the stream, counted
        r = c.post(GEN, json={"prompt": "next", "size": "32x32", "steps": 1, "stream": True})
        assert r.status_code == 200 and read_events(r)[-1][0] == "image_generation.completed"


def test_a_stream_past_its_deadline_ends_with_a_timeout_event(pipe):  # noqa: F811
    app = build_app(pipe, ServeConfig(max_wait_ms=0, timeout_s=1.0))
    counting(app.state.server, delay=0.05)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        start = time.monotonic()
        events = read_events(c.post(GEN, json={"prompt": "slow", "size": "256x256", "steps": 1, "stream": True}))
        assert events[-1][0] == "error" and "timed out after 1 s" in events[-1][1]["error"]["message"]
        assert events[-1][1]["error"]["type"] == "timeout" and time.monotonic() - start < 5
        wait_until(lambda: c.get("/metrics").json()["cancelled"] == 1, timeout=5)
        assert c.get("/metrics").json()["streams"]["failed"] == 1
