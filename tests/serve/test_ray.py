"""The API on Ray Serve, on a local CPU cluster of two replicas of the built-in model: the same contract,
load spread over both replicas, the single-process server's images and streams, and a killed replica answered
503 (an error event mid-stream)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e .[ray])")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from ray import serve  # noqa: E402

from nextstep.assets import builtin_model_dir  # noqa: E402
from nextstep.sampling.pipeline import Pipeline  # noqa: E402
from nextstep.serve.api import ServeConfig, build_app  # noqa: E402
from nextstep.serve.middleware import ApiError  # noqa: E402
from nextstep.serve.ray_serve import (  # noqa: E402
    APP_NAME,
    REPLICA_HEADER,
    RayConfig,
    build_application,
    next_piece,
)
from tests.serve.test_stream import read_events  # noqa: E402

GEN = "/v1/images/generations"
SERVE = ServeConfig(model_name="tiny", max_batch=8, max_wait_ms=50, max_n=4, max_steps=8, default_size=(32, 32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    if builtin_model_dir() is None:
        pytest.skip("the built-in model is not shipped in this checkout")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # ray.init replaces them
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(RayConfig(replicas=2, health_check_period_s=1, serve=SERVE)), name=APP_NAME)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="module")
def single():
    """The single-process server with the same limits, for the expected images."""
    app = build_app(Pipeline.from_pretrained(builtin_model_dir(), device="cpu"), SERVE)
    with TestClient(app) as client:
        yield client


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=int)


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: c.post(GEN, json=body), bodies))


def replica_metrics(url: str, replica: str) -> dict:
    """/metrics of one replica: the gateway routes each request to either, so ask until that one answers."""
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(100):
            r = c.get("/metrics")
            if r.headers[REPLICA_HEADER] == replica:
                return r.json()
    raise AssertionError(f"replica {replica} did not answer /metrics in 100 tries")


def running_replicas() -> int:
    app = serve.status().applications[APP_NAME]
    return app.deployments["ImageModel"].replica_states.get("RUNNING", 0)


def test_routes_and_errors_are_the_single_servers(url, single):
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        for body, status, param in [({"prompt": "a", "n": 9}, 400, "n"), ({"prompt": "a", "sed": 1}, 400, "sed")]:
            r, want = c.post(GEN, json=body), single.post(GEN, json=body)
            assert (r.status_code, r.json()) == (want.status_code, want.json()) == (status, want.json())
            assert r.json()["error"]["param"] == param
        assert (
            c.post("/v1/images/edits", json={"prompt": "x"}).json()
            == single.post("/v1/images/edits", json={"prompt": "x"}).json()
        )
        assert "responses" in c.get("/metrics").json() and c.get("/metrics").headers[REPLICA_HEADER]


def test_load_spreads_over_both_replicas_with_the_single_servers_images(url, single):
    bodies = [{"prompt": f"a red circle {i}", "seed": i, "steps": 2} for i in range(8)]
    responses = post_all(url, bodies)
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2
    for body, r in zip(bodies, responses, strict=True):
        want = single.post(GEN, json=body).json()
        assert r.json()["seed"] == want["seed"]
        assert np.abs(pixels(r.json()["data"][0]) - pixels(want["data"][0])).max() <= 1  # batch-shape rounding


def test_streams_through_the_gateway_are_the_single_servers_streams(url, single):
    # 64x64: a grid of 4 rows of 16 px tokens, partial images after rows 1, 2 and 3
    body = {"prompt": "a red circle", "seed": 5, "n": 2, "stream": True, "partial_images": 3, "size": "64x64"}
    body["steps"] = 2
    r = httpx.post(url + GEN, json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events, want = read_events(r), read_events(single.post(GEN, json=body))
    assert [name for name, _ in events] == [name for name, _ in want]
    partials = [data for name, data in events if name == "image_generation.partial_image"]
    assert len(partials) == 2 * 3 and all(pixels(p).shape == (64, 64, 3) for p in partials)
    for (_, got), (_, expected) in zip(events, want, strict=True):
        assert np.abs(pixels(got) - pixels(expected)).max() <= 1  # batch-shape rounding
    plain = httpx.post(url + GEN, json={k: v for k, v in body.items() if k not in ("stream", "partial_images")})
    completed = [data["b64_json"] for name, data in events if name == "image_generation.completed"]
    assert completed == [item["b64_json"] for item in plain.json()["data"]]
    streams = replica_metrics(url, r.headers[REPLICA_HEADER])["streams"]
    assert streams["completed"] >= 1 and streams["partial_images"] >= 6


def test_a_client_leaving_a_stream_through_the_gateway_stops_its_generation(url):
    body = {"prompt": "gone", "seed": 1, "stream": True, "partial_images": 3, "size": "256x256", "steps": 8}
    with httpx.Client(base_url=url, timeout=60) as c:
        names = {c.get("/health").headers[REPLICA_HEADER] for _ in range(50)}
    assert len(names) == 2
    before = {name: replica_metrics(url, name) for name in names}
    with httpx.stream("POST", url + GEN, json=body, timeout=60) as r:
        replica = r.headers[REPLICA_HEADER]
        assert next(r.iter_lines()) == "event: image_generation.partial_image"
    # the connection is closed with 3/4 of the rows to draw (about 5 s here); the stream counts the disconnect
    # at once, the batch its cancellation at its next token
    was, deadline = before[replica], time.monotonic() + 30
    while (metrics := replica_metrics(url, replica))["cancelled"] == was["cancelled"]:
        assert time.monotonic() < deadline, metrics
    assert metrics["streams"]["disconnected"] == was["streams"]["disconnected"] + 1
    assert metrics["cancelled"] == was["cancelled"] + 1
    assert metrics["streams"]["completed"] == was["streams"]["completed"]


def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(url):
    # a long stream names the victim: killed after its first partial image, it must end with an error event
    slow = {"prompt": "doomed", "seed": 2, "stream": True, "partial_images": 3, "size": "256x256", "steps": 8}
    # 32 requests of 4 images at the most steps SERVE allows: far longer than the 1 s before the kill on any
    # machine (4x the work that took about 4 s here), so some are in flight on the victim when it dies.
    bodies = [{"prompt": f"a blue square {i}", "seed": i, "steps": 8, "n": 4, "size": "64x64"} for i in range(32)]
    with httpx.stream("POST", url + GEN, json=slow, timeout=120) as stream, ThreadPoolExecutor(1) as pool:
        victim = stream.headers[REPLICA_HEADER]
        lines = stream.iter_lines()
        assert next(lines) == "event: image_generation.partial_image"
        load = pool.submit(post_all, url, bodies)
        time.sleep(1)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        last = [line for line in lines if line][-2:]
        responses = load.result(timeout=120)
    assert last[0] == "event: error", last
    error = json.loads(last[1].removeprefix("data: "))["error"]
    assert "replica serving this request died" in error["message"] and error["type"] == "server_error"
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert "replica serving this request died" in r.json()["error"]["message"]
        else:
            assert len(r.json()["data"]) == 4
    deadline = time.monotonic() + 120
    while running_replicas() < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    after = post_all(url, [{"prompt": f"again {i}", "seed": i, "steps": 1} for i in range(6)])
    assert [r.status_code for r in after] == [200] * 6
    assert victim not in {r.headers[REPLICA_HEADER] for r in after}


def test_the_shipped_config_file_is_valid_for_serve_run():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "serve_ray.yaml").read_text())
    app = ServeDeploySchema.model_validate(raw).applications[0]
    config = RayConfig.from_dict(app.args)
    assert (config.replicas, config.max_replicas, config.serve.max_batch) == (1, 4, 16)
    with pytest.raises(ValueError, match="unknown option.*replica_count"):
        RayConfig.from_dict({"replica_count": 2})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "0"], "replicas must be >= 1, got 0"),
        (["--replicas", "2", "--max-replicas", "1"], "max_replicas (1) must be >= replicas (2)"),
        (["--replicas=1", "--max-batch", "0"], "max_batch must be > 0, got 0"),
        (["--replicas", "2", "--gpus-per-replica", "1.5"], "gpus_per_replica above 1 must be a whole number, got 1.5"),
    ],
)
def test_serve_with_bad_replica_options_exits_2_naming_the_value(argv, message, capsys):
    from nextstep.serve.api import main_serve

    assert main_serve(argv) == 2
    assert f"nextstep serve: error: {message}" in capsys.readouterr().err


def test_requests_arriving_while_a_replica_runs_a_batch_all_join_its_next_batch(url):
    """Why replicas batch with the server's own Batcher and not @serve.batch: Ray's decorator forms the next
    batch while the current one runs (in max_wait windows), so requests trickling in during a long batch ran
    as many batches of 1-3 images; the Batcher forms a batch when the model is free, from all that waits."""
    replicas = {r.headers[REPLICA_HEADER] for r in post_all(url, [{"prompt": "a", "steps": 1}] * 4)}
    before = {name: replica_metrics(url, name)["batch_images"] for name in replicas}
    slow = {"prompt": "a red circle", "size": "128x128", "steps": 8, "seed": 0}  # ~0.5 s a batch on CPU
    bodies = [slow] * 2 + [{"prompt": f"a blue star {i}", "seed": i, "steps": 2} for i in range(16)]

    def post(i: int) -> httpx.Response:
        time.sleep(0.03 * i if i >= 2 else 0)  # the first two start batches; the rest trickle in meanwhile
        with httpx.Client(base_url=url, timeout=120) as c:
            return c.post(GEN, json=bodies[i])

    with ThreadPoolExecutor(len(bodies)) as pool:
        assert [r.status_code for r in pool.map(post, range(len(bodies)))] == [200] * len(bodies)
    new = Counter()
    for name in replicas:
        after = replica_metrics(url, name)["batch_images"]
        new.update({int(k): v - before[name].get(k, 0) for k, v in after.items() if v > before[name].get(k, 0)})
    assert sum(k * v for k, v in new.items()) == len(bodies)
    # the 16 trickling requests (8 per replica, max_batch 8) in at most 4 batches; @serve.batch took 6 or more
    assert sum(new.values()) - 2 <= 4, f"batches (images: count) {dict(new)}"


class Replies:
    """A stand-in for a replica's DeploymentResponseGenerator: its next piece raises `error` after `delay_s`."""

    def __init__(self, error: BaseException | None, delay_s: float = 0):
        self.error, self.delay_s, self.cancelled = error, delay_s, False

    async def __anext__(self):
        await asyncio.sleep(self.delay_s)
        raise self.error

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize(
    "replies, status, message",
    [
        (Replies(None, delay_s=10), 504, "no replica answered in 0.2 s"),
        (Replies(ray.exceptions.ActorDiedError()), 503, "the replica serving this request died"),
        (Replies(ray.exceptions.RayTaskError("respond", "", KeyError("x"))), 500, "the replica failed: KeyError"),
    ],
)
def test_the_gateway_answers_a_hung_dead_or_failing_replica_with_a_clear_error(replies, status, message):
    """What the gateway answers (a JSON error, or mid-stream an error event) when a replica hangs, dies or fails."""
    start = time.monotonic()
    with pytest.raises(ApiError) as e:
        asyncio.run(next_piece(replies, start, 0.2))
    assert e.value.status == status and message in e.value.message and time.monotonic() - start < 2
    assert replies.cancelled == (status == 504)  # a hung replica's call is cancelled, not left running
