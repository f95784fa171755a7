"""The image API as a client sees it: OpenAI shapes, batching that keeps seeds reproducible, clear 4xx, survival."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from nextstep.assets import builtin_model_dir  # noqa: E402
from nextstep.cli import main as cli_main  # noqa: E402
from nextstep.sampling.chain import KEY, Chain, pixel_sha256  # noqa: E402
from nextstep.sampling.pipeline import GenerateOptions, Pipeline  # noqa: E402
from nextstep.serve.api import ServeConfig, Server, batch_buckets, build_app  # noqa: E402
from nextstep.serve.batching import Batcher, BatchKey, Job, QueueFull, run_batch  # noqa: E402
from nextstep.shapes.synth import make_sample  # noqa: E402
from tests.refs import ROOT  # noqa: E402

REFERENCE = ROOT / "nextstep11-tiny"
SMALL = {"size": "32x32", "steps": 2}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The built-in model once it ships, else the tiny official-format reference."""
    path = builtin_model_dir() or REFERENCE
    if not (path / "config.json").is_file():
        pytest.skip(f"no model: neither the built-in model nor {REFERENCE} is present")
    return path


@pytest.fixture(scope="module")
def pipe(model_dir) -> Pipeline:
    return Pipeline.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def alone(model_dir) -> Pipeline:
    """A second pipeline for expected images, so the test never shares the server's one."""
    return Pipeline.from_pretrained(model_dir, device="cpu")


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on 127.0.0.1 (a free port); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def app(pipe):
    config = ServeConfig(model_name="tiny", max_batch=16, max_wait_ms=100, max_n=4, max_steps=8, default_size=(32, 32))
    return build_app(pipe, config)


@pytest.fixture(scope="module")
def client(app) -> Iterator[httpx.Client]:
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png(size=(48, 32), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_generation_matches_the_pipeline(client, alone):
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "seed": 3, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and body["seed"] == 3 and len(body["data"]) == 2
    images = [decode(item) for item in body["data"]]
    assert all(im.format == "PNG" and im.size == (32, 32) for im in images)
    expected = alone.generate("a cat", size=(32, 32), steps=2, n=2, seed=3)
    for got, want in zip(images, expected, strict=True):
        assert np.array_equal(pixels(got), pixels(want)), "a request served alone must equal pipe.generate"
    for i, (item, image) in enumerate(zip(body["data"], images, strict=True)):
        (turn,) = Chain.from_json(image.info[KEY]).turns  # the PNG's record, the same as the item's
        assert Chain.from_json(json.dumps(item["nextstep"])).turns == [turn]
        assert (turn.command, turn.prompt, turn.seed, turn.index, turn.model) == ("generate", "a cat", 3, i, "tiny")
        assert turn.options["size"] == [32, 32] and turn.options["steps"] == 2 and turn.sha256 == pixel_sha256(image)


def test_an_edit_of_the_returned_image_continues_the_chain(client, alone):
    """Edit a scene, send the returned PNG back with the next turn's seed: the two responses are the two turns of
    pipe.edit_chain, pixels and records (seed, options, instruction, turn, parent hash) alike."""
    source = make_sample(5, seed=0).images[0]  # 128x128
    chain = alone.edit_chain(source, ["make the star yellow", "add a blue circle"], seed=5, steps=2, model="tiny")
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    upload, seed = buf.getvalue(), 5
    for k, instruction in enumerate(["make the star yellow", "add a blue circle"]):
        files = {"image": ("in.png", upload, "image/png")}
        r = client.post("/v1/images/edits", files=files, data={"prompt": instruction, "seed": str(seed), "steps": "2"})
        assert r.status_code == 200, r.text
        item = r.json()["data"][0]
        assert np.array_equal(pixels(decode(item)), pixels(chain[k])), f"turn {k + 1} differs from edit_chain"
        assert item["nextstep"] == json.loads(chain[k].info[KEY])
        turn = item["nextstep"]["turns"][-1]
        assert (turn["turn"], turn["seed"], turn["prompt"]) == (k + 1, 5 + k, instruction)
        upload, seed = base64.b64decode(item["b64_json"]), turn["seed"] + 1
    assert item["nextstep"]["turns"][0]["parent_sha256"] == pixel_sha256(source)


def test_edit_keeps_the_source_size_or_takes_size(client):
    files = {"image": ("in.png", png((48, 32)), "image/png")}
    r = client.post("/v1/images/edits", files=files, data={"prompt": "make it blue", "steps": "2", "cfg_img": "1.5"})
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]).size == (48, 32)
    r = client.post("/v1/images/edits", files=files, data={"prompt": "make it blue", "n": "2", **SMALL})
    assert r.status_code == 200, r.text
    assert [decode(item).size for item in r.json()["data"]] == [(32, 32), (32, 32)]


def test_the_official_openai_client_works(client):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    r = api.images.generate(prompt="a cat", n=2, size="32x32", response_format="b64_json", extra_body={"steps": 2})
    assert len(r.data) == 2 and decode(r.data[0].model_dump()).size == (32, 32)
    source = io.BytesIO(png((48, 32)))
    source.name = "in.png"
    r = api.images.edit(image=source, prompt="make it blue", extra_body={"steps": 2})
    assert decode(r.data[0].model_dump()).size == (48, 32)
    assert r.data[0].model_dump()["nextstep"]["turns"][0]["prompt"] == "make it blue"
    with pytest.raises(openai.BadRequestError, match="'url' is not supported"):
        api.images.generate(prompt="a cat", response_format="url")
    assert [m.id for m in api.models.list()] == ["tiny"]


def test_health_models_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    metrics = client.get("/metrics").json()
    assert {"requests", "batches", "batch_images", "batch_requests", "responses", "queued"} <= set(metrics)


def test_concurrent_requests_are_batched_and_stay_reproducible(client, alone):
    """32 requests at once (two sizes, n 1 or 2, own seeds): all succeed in fewer pipeline calls than requests,
    and each one's images equal the same request served alone, up to float rounding: the batch shape changes
    it, and the autoregressive loop can carry a last-bit difference into a few pixels of an image (mean
    difference under 0.5/255, where the same request with another seed differs by tens)."""
    reqs = [
        {"prompt": f"shape number {i}" + " big" * (i % 5), "seed": 100 + i, "n": 1 + i % 2, "steps": 2}
        | {"size": "32x32" if i % 4 else "48x32"}
        for i in range(32)
    ]
    before = client.get("/metrics").json()
    with ThreadPoolExecutor(len(reqs)) as pool:
        responses = list(pool.map(lambda body: client.post("/v1/images/generations", json=body), reqs))
    after = client.get("/metrics").json()
    assert [r.status_code for r in responses] == [200] * len(reqs), [r.text for r in responses if r.status_code != 200]
    batches = after["batches"] - before["batches"]
    assert batches < len(reqs), f"{len(reqs)} requests took {batches} pipeline calls"
    assert max(int(k) for k in after["batch_requests"]) > 1
    for body, r in zip(reqs, responses, strict=True):
        w, h = (int(v) for v in body["size"].split("x"))
        want = alone.generate(body["prompt"], size=(h, w), steps=2, n=body["n"], seed=body["seed"])
        got = [decode(item) for item in r.json()["data"]]
        assert len(got) == body["n"]
        for g, e in zip(got, want, strict=True):
            diff = np.abs(pixels(g) - pixels(e))
            assert diff.mean() < 0.5 and diff.max() <= 16, (body, diff.mean(), diff.max())
    other = alone.generate(reqs[0]["prompt"], size=(32, 48), steps=2, seed=reqs[0]["seed"] + 1)[0]
    assert np.abs(pixels(decode(responses[0].json()["data"][0])) - pixels(other)).mean() > 5


GEN = "/v1/images/generations"
BAD = [
    (GEN, {"content": b'{"prompt": "a cat",', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    (GEN, {"json": ["a cat"]}, 400, "must be a JSON object"),
    (GEN, {"json": {"prompt": "a cat", "size": "1000x1000"}}, 400, "size '1000x1000' is not supported"),
    (GEN, {"json": {"prompt": "a cat", "size": "large"}}, 400, "size must look like WIDTHxHEIGHT"),
    (GEN, {"json": {"prompt": "a cat", "n": 0}}, 400, "n must be from 1 to 4, got 0"),
    (GEN, {"json": {"prompt": "a cat", "n": 5}}, 400, "n must be from 1 to 4, got 5"),
    (GEN, {"json": {"prompt": "   "}}, 400, "prompt must be a non-empty string"),
    (GEN, {"json": {"n": 1}}, 400, "prompt is required"),
    (GEN, {"json": {"prompt": "cat " * 1100}}, 400, "prompt has 4400 characters"),
    (GEN, {"json": {"prompt": "a cat", "response_format": "url"}}, 400, "response_format 'url' is not supported"),
    (GEN, {"json": {"prompt": "a cat", "sed": 1}}, 400, "unknown field 'sed'"),
    (GEN, {"json": {"prompt": "a cat", "model": "dall-e-3"}}, 404, "model 'dall-e-3' is not served here"),
    (GEN, {"json": {"prompt": "a cat", "steps": 1000}}, 400, "steps must be from 1 to 8"),
    (GEN, {"json": {"prompt": "a cat", "cfg": -1}}, 400, "cfg must be > 0"),
    (GEN, {"json": {"prompt": "a cat", "seed": -5}}, 400, "seed must be from 0"),
    (GEN, {"json": {"prompt": "a cat", "n": "two"}}, 400, "n: Input should be a valid integer"),
    (GEN, {"content": b"x" * (21 * 2**20)}, 413, "request body exceeds the limit"),
    ("/v1/images/edits", {"files": {"image": ("a.png", b"not an image", "image/png")}, "data": {"prompt": "x"}}, 400,
     "not an image format"),
    ("/v1/images/edits", {"data": {"prompt": "x"}, "files": {"other": ("a", b"1")}}, 400, "exactly one image file"),
    ("/v1/images/edits", {"json": {"prompt": "x"}}, 400, "edits take multipart/form-data"),
    ("/v1/images/edits", {"files": {"image": ("a.png", png((8, 8)), "image/png")}, "data": {"prompt": "x"}}, 400,
     "smaller than 16 px"),
    ("/v1/images/nope", {"json": {}}, 404, "Not Found"),
]  # fmt: skip


@pytest.mark.parametrize("path, kwargs, status, message", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_requests_get_a_clear_4xx_and_the_server_lives_on(client, path, kwargs, status, message):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"]
    assert client.get("/health").status_code == 200


def test_server_still_generates_after_bad_requests(client):
    r = client.post(GEN, json={"prompt": "still alive", **SMALL})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_busy_server_answers_429_504_and_stays_responsive(pipe):
    """With the pipeline stuck: /health still answers, the queue limit gives 429, the timeout 504."""
    app = build_app(pipe, ServeConfig(max_queue=1, timeout_s=1.0, max_wait_ms=0, default_size=(32, 32)))
    release = threading.Event()

    def stuck(jobs, on_token):
        release.wait(30)
        return [[Image.new("RGB", (32, 32))] * job.n for job in jobs]

    app.state.server.batcher.run = stuck
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, GEN, json={"prompt": "first"})
        while c.get("/metrics").json()["batches"] < 1:  # the first request is inside the pipeline
            time.sleep(0.01)
        second = pool.submit(c.post, GEN, json={"prompt": "second"})
        while c.get("/health").json()["queued"] < 1:
            time.sleep(0.01)
        start = time.monotonic()
        assert c.get("/health").status_code == 200 and time.monotonic() - start < 0.5
        third = c.post(GEN, json={"prompt": "third"})
        assert third.status_code == 429 and "server busy" in third.json()["error"]["message"]
        assert second.result().status_code == 504
        assert "timed out after 1 s" in second.result().json()["error"]["message"]
        release.set()
        assert first.result().status_code == 504  # it was stuck past its timeout too
        assert c.post(GEN, json={"prompt": "after"}).status_code == 200


def test_one_bad_request_fails_alone_in_its_batch(pipe):
    app = build_app(pipe, ServeConfig(max_wait_ms=300, default_size=(32, 32)))

    def picky(jobs, on_token):
        if any(job.prompt == "bad" for job in jobs):
            raise ValueError("the pipeline refuses 'bad'")
        return [[Image.new("RGB", (32, 32))] * job.n for job in jobs]

    app.state.server.batcher.run = picky
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(3) as pool:
        rs = list(pool.map(lambda p: c.post(GEN, json={"prompt": p}), ["good", "bad", "fine"]))
        assert [r.status_code for r in rs] == [200, 400, 200]
        assert "refuses 'bad'" in rs[1].json()["error"]["message"]
        assert c.get("/metrics").json()["batch_requests"].get("3") == 1


def job(key: str, n: int = 1) -> Job:
    return Job(key=BatchKey(kind="generate", options=(("size", key),)), prompt="p", seed=0, n=n)


def test_batcher_groups_by_options_and_caps_images():
    """Jobs of one key share calls of at most max_batch images; another key waits for its own call;
    a job larger than max_batch runs alone; the queue limit raises QueueFull."""
    calls = []

    def run(jobs, on_token):
        calls.append([(j.key.options[0][1], j.n) for j in jobs])
        return [[None] * j.n for j in jobs]

    async def scenario():
        batcher = Batcher(run, max_batch=4, max_wait_s=0.05, max_queue=8)
        batcher.start()
        jobs = [job("a", 2), job("b"), job("a"), job("a", 2), job("a"), job("b"), job("c", 6)]
        futures = [batcher.submit(j) for j in jobs]
        batcher.submit(job("d"))
        with pytest.raises(QueueFull):
            batcher.submit(job("e"))
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [len(r) for r in results] == [2, 1, 1, 2, 1, 1, 6]
    assert calls[:4] == [[("a", 2), ("a", 1), ("a", 1)], [("b", 1), ("b", 1)], [("a", 2)], [("c", 6)]]


def test_run_batch_gives_each_request_its_own_draws(pipe, monkeypatch):
    seen = {}

    def generate(prompts, **options):
        seen.update(options)
        return [Image.new("RGB", (32, 32))] * len(prompts)

    monkeypatch.setattr(pipe, "generate", generate)
    jobs = [job("a", 2), job("a")]
    jobs[0].seed, jobs[1].seed = 5, 7
    assert [len(images) for images in run_batch(pipe, jobs)] == [2, 1]
    rows = seen["draw"]((3, 4))
    assert torch.equal(rows[:2], torch.randn((2, 4), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(rows[2:], torch.randn((1, 4), generator=torch.Generator().manual_seed(7)))


def test_batched_draws_reproduce_lone_requests_on_the_fast_engine(pipe):
    """The fast engine (the GPU default) honours the draw hook too, so batching keeps per-request seeds."""
    from nextstep.serve.batching import _draws

    opts = dict(size=(32, 32), steps=2, cfg=3.0, engine="fast")
    batched = pipe.generate(["a dog", "a red car"], draw=_draws([5, 7], [1, 1], torch.device("cpu")), **opts)
    alone = pipe.generate("a red car", seed=7, **opts)[0]
    diff = np.abs(np.asarray(batched[1], dtype=int) - np.asarray(alone, dtype=int)).max()
    assert diff <= 1


def test_serve_reports_a_missing_model(capsys):
    assert cli_main(["serve", "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err.startswith("nextstep: error: model directory not found")


def test_batch_buckets_are_powers_of_two_up_to_max_batch():
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)
    with pytest.raises(ValueError, match="keep_states must be > 0, got 0"):
        ServeConfig(keep_states=0)


def test_server_warm_builds_a_state_per_batch_bucket(model_dir):
    """What a GPU server does before its first request (configure_engine there follows the model's device)."""
    pipe = Pipeline.from_pretrained(model_dir, device="cpu")
    server = Server(pipe, ServeConfig(max_batch=4, default_size=(32, 32)))
    assert pipe.engine_options == {}  # on CPU: no padding, one state
    pipe.configure_engine(max_states=4, batch_buckets=batch_buckets(4))
    server.warm()
    engine = pipe.engine(GenerateOptions(**pipe.defaults))
    default_steps = GenerateOptions(**pipe.defaults).steps
    kept = sorted(k.batch for k in engine._states if k.settings.num_steps == default_steps)
    assert kept == [1, 2, 4] and server.warmed
    states = dict(engine._states)
    server.warm()  # once
    assert engine._states == states
