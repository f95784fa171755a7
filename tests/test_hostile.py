"""Hostile probes (issue #19) through the real `nextstep` command and the real server: every bad input is one
`nextstep: error:` line and exit 2 (checked before the model loads where the input allows), untrusted files are
refused, and a request nobody waits for any more stops its generation instead of wedging the server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.bombs import bomb_png
from tests.refs import ROOT as REFERENCES

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from nextstep.io import open_image  # noqa: E402
from nextstep.sampling.pipeline import Pipeline  # noqa: E402
from nextstep.serve.api import ServeConfig, build_app  # noqa: E402
from tests.serve.test_api import running  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REFERENCES / "nextstep11-tiny"
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    return {side: bomb_png(folder / f"bomb{side}.png", side) for side in (12000, 30000)}


def nextstep(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "nextstep.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def assert_one_line(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextstep: error: "), r.stderr
    assert message in lines[0], r.stderr


def copy_model(tmp_path: Path, name: str = "m") -> Path:
    dst = tmp_path / name
    shutil.copytree(TINY, dst, ignore=shutil.ignore_patterns("reference", "README.md"))
    return dst


def broken(tmp_path: Path) -> Path:
    """A checkpoint whose weights cannot load: any error about the options must come before loading them."""
    model = copy_model(tmp_path, "broken")
    (model / "model.safetensors").write_bytes(b"")
    return model


def test_bomb_pngs_are_tiny_on_disk(bombs):
    assert bombs[12000].stat().st_size < 50_000 and bombs[30000].stat().st_size < 200_000
    for side, path in bombs.items():  # read from the header: PIL warns about or refuses to open them
        assert struct.unpack(">IIB", path.read_bytes()[16:25]) == (side, side, 1)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: (m / "model.safetensors").write_bytes(b""), "model.safetensors (truncated or not a safetensors"),
        (lambda m: _truncate(m / "model.safetensors", 0.9), "model.safetensors (truncated or not a safetensors"),
        (lambda m: _truncate(m / "vae" / "checkpoint.pt", 0.5), "checkpoint.pt (truncated or not a torch file"),
        (lambda m: (m / "tokenizer.json").write_text("garbage{"), "cannot read tokenizer"),
        (lambda m: _index(m, "../../../../etc/passwd"), "shards must be files inside"),
        (lambda m: _index(m, "/etc/passwd"), "shards must be files inside"),
    ],
    ids=["empty-weights", "truncated-weights", "truncated-vae", "garbage-tokenizer", "index-escape", "index-absolute"],
)
def test_broken_checkpoints_are_one_line(tmp_path, damage, message):
    model = copy_model(tmp_path)
    damage(model)
    r = nextstep(
        "generate", "a cat", "--model", str(model), "--size", "32x32", "--steps", "1", "-o", str(tmp_path / "o.png")
    )
    assert_one_line(r, message)
    assert not (tmp_path / "o.png").exists()


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _index(model: Path, shard: str) -> None:
    index = {"weight_map": {"embed_tokens.weight": "model.safetensors", "norm.weight": shard}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "5000"], "steps must be > 0 and <= 1000, got 5000"),
        (["--steps", "0"], "steps must be > 0"),
        (["--cfg", "nan"], "cfg must be > 0 and <= 100, got nan"),
        (["--shift", "inf"], "shift must be > 0 and <= 100, got inf"),
        (["--noise-level=-inf"], "noise_level must be in [0, 10], got -inf"),
        (["--size", "100x100"], "multiples of 16"),
        (["--size", "4096x64"], "from 1 to 2048 px"),
        (["--n", "0"], "n (images per prompt) must be from 1 to 64, got 0"),
        (["--seed", "-1"], "seed must be from 0"),
        (["--sampler", "euler"], "invalid choice: 'euler'"),
        (["-o", "{tmp}/dir.png"], "is a directory"),
        (["-o", "{tmp}/file.txt/o.png"], "is not a directory"),
        (["-o", "/proc/o.png"], "cannot be written"),
        (["-o", "{tmp}/o.jpg"], "must be a .png"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(tmp_path, args, message):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file.txt").write_text("a file")
    args = [a.format(tmp=tmp_path) for a in args]
    r = nextstep("generate", "a cat", "--model", str(broken(tmp_path)), "-o", str(tmp_path / "o.png"), *args)
    assert_one_line(r, message)


def test_bad_prompt_and_input_images_are_refused_before_the_model_loads(tmp_path, bombs):
    model = str(broken(tmp_path))
    assert_one_line(nextstep("generate", "  ", "--model", model), "prompt must be a non-empty string")
    for side, message in ((12000, "is 12000x12000 (144000000 pixels), more than"), (30000, "has 900000000 pixels")):
        start = time.monotonic()
        r = nextstep(
            "edit", "--image", str(bombs[side]), "make it blue", "--model", model, "-o", str(tmp_path / "e.png")
        )
        assert_one_line(r, message)
        assert "the limit of 16777216 pixels" in r.stderr and time.monotonic() - start < 60


def assert_ends_in_one_error(r: subprocess.CompletedProcess, message: str) -> None:
    """For commands that log as they work (training): exit 2, no traceback, one error line and it is the last."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert r.stderr.count("nextstep: error: ") == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("nextstep: error: ") and message in last, last


def test_training_on_unreadable_data_or_another_architecture_is_one_line(tmp_path):
    from nextstep.data.format import Sample, write_shards

    images = [Image.new("RGB", (32, 32), (60 * i, 0, 0)) for i in range(4)]
    write_shards([Sample(f"s{i}", "a red square <image_0>", [im]) for i, im in enumerate(images)], tmp_path / "ok")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cut.tar").write_bytes((tmp_path / "ok" / "data-000000.tar").read_bytes()[:700])

    def train(data: str, *args: str) -> subprocess.CompletedProcess:
        datasets = json.dumps([{"shards": str(tmp_path / data), "name": data}])
        common = [f"data.datasets={datasets}", "data.image_size=32", "data.batch_size=2", "logging.progress=false"]
        common.append("training.save_steps=1")
        return nextstep("train", "-m", "configs.debug", *common, f"training.output_dir={tmp_path / 'run'}", *args)

    assert_ends_in_one_error(train("bad", "training.max_steps=1"), "dataset 'bad': no readable samples in its 1 shard")
    r = train("ok", "training.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = train("ok", "training.max_steps=2", "--resume", "model.arch.num_hidden_layers=3")
    assert_ends_in_one_error(r, "was written by a model of other shapes: layers.2.")


def warnings_of(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("warning: ")]


def test_builtin_model_states_its_limits(tmp_path):
    """The built-in model was trained at 128x128 on the shapes edit templates (its sampling_defaults.json says
    so): another size or another instruction is one warning line, and the image is still made."""
    r = nextstep("generate", "a red circle", "--size", "64x128", "--steps", "1", "-o", str(tmp_path / "g.png"))
    assert r.returncode == 0 and (tmp_path / "g.png").is_file(), r.stderr
    assert warnings_of(r) == [
        "warning: this model was trained at 128x128 only; at 64x128 expect noise rather than an image"
    ]
    Image.new("RGB", (128, 128), "white").save(tmp_path / "in.png")
    edit = ("edit", "--image", str(tmp_path / "in.png"), "--steps", "1", "-o", str(tmp_path / "e.png"))
    r = nextstep(*edit, "make it look like van gogh")
    assert r.returncode == 0 and (tmp_path / "e.png").is_file(), r.stderr
    (line,) = warnings_of(r)  # and none about the size: 128x128 is the training size
    assert line.startswith("warning: edit instruction 'make it look like van gogh' is not one the shapes model was")
    assert line.endswith("'add a green heart at the top'; editing anyway")
    r = nextstep("generate", "a pink circle next to a pentagon", "--steps", "1", "-o", str(tmp_path / "w.png"))
    assert r.returncode == 0 and (tmp_path / "w.png").is_file(), r.stderr
    (line,) = warnings_of(r)  # words it never saw are named, not silently drawn as something else
    assert line.startswith("warning: the built-in model does not know 'pink', 'pentagon' and may draw"), line


# ---- the server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained(TINY, device="cpu")


def counting(server, *, delay: float) -> list[int]:
    """Wrap the server's pipeline runs: record each image token (k) and slow each by `delay` seconds, so a
    generation lasts long enough to be abandoned."""
    calls: list[int] = []
    real = server.batcher.run

    def run(jobs, on_token):
        def counted(k, tokens):
            calls.append(k)
            time.sleep(delay)
            on_token(k, tokens)

        return real(jobs, counted)

    server.batcher.run = run
    return calls


def wait_until(condition, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - start


BIG = {"size": "256x256", "steps": 1}  # 16 x 16 = 256 image tokens


def test_disconnected_client_stops_its_generation(pipe):
    app = build_app(pipe, ServeConfig(max_wait_ms=0))
    server = app.state.server
    calls = counting(server, delay=0.05)  # >= 12.8 s for the whole image
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + GEN, json={"prompt": "abandoned", **BIG}, timeout=1.0)  # the client gives up
        assert wait_until(lambda: c.get("/metrics").json()["cancelled"] == 1) < 5
        assert 0 < len(calls) < 256 // 4, f"{len(calls)} of 256 tokens ran for a client that had gone"
        calls.clear()
        r = c.post(GEN, json={"prompt": "next", "size": "32x32", "steps": 1})
        assert r.status_code == 200 and calls == [0, 1, 2, 3]
        assert {"path": GEN, "status": 499, "count": 1} in c.get("/metrics").json()["responses"]


def test_expired_request_stops_its_generation(pipe):
    app = build_app(pipe, ServeConfig(max_wait_ms=0, timeout_s=1.0))
    calls = counting(app.state.server, delay=0.05)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(GEN, json={"prompt": "too slow", **BIG})
        assert r.status_code == 504 and "timed out after 1 s" in r.json()["error"]["message"]
        wait_until(lambda: c.get("/metrics").json()["cancelled"] == 1, timeout=5)
        assert len(calls) < 256 // 4
        assert c.post(GEN, json={"prompt": "next", "size": "32x32", "steps": 1}).status_code == 200


def test_a_batch_runs_on_while_one_of_its_requests_waits(pipe):
    """Two requests share a batch; the one that disconnects does not cancel the other's images."""
    app = build_app(pipe, ServeConfig(max_wait_ms=500))
    calls = counting(app.state.server, delay=0.05)  # 64 tokens: >= 3.2 s
    mid = {"size": "128x128", "steps": 1}
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(2) as pool:
        gone = pool.submit(httpx.post, url + GEN, json={"prompt": "gone", **mid}, timeout=1.0)
        stays = pool.submit(c.post, GEN, json={"prompt": "stays", **mid})
        with pytest.raises(httpx.ReadTimeout):
            gone.result()
        assert stays.result().status_code == 200
        metrics = c.get("/metrics").json()
        assert metrics["batch_requests"] == {"2": 1} and metrics["cancelled"] == 0 and len(calls) == 64


def test_health_reports_a_stalled_worker(pipe):
    app = build_app(pipe, ServeConfig(max_wait_ms=0, stall_s=0.5, default_size=(32, 32)))
    release = threading.Event()

    def stuck(jobs, on_token):
        release.wait(30)
        return [[Image.new("RGB", (32, 32))] * job.n for job in jobs]

    app.state.server.batcher.run = stuck
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        assert c.get("/health").json()["status"] == "ok"
        first = pool.submit(c.post, GEN, json={"prompt": "stuck"})
        wait_until(lambda: c.get("/health").status_code == 503, timeout=10)
        assert c.get("/health").json()["status"].startswith("stalled: the running batch has made no progress")
        release.set()
        assert first.result().status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_hostile_bodies_get_400_json_and_are_counted(pipe, bombs):
    app = build_app(pipe, ServeConfig(default_size=(32, 32)))
    server = app.state.server
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        nested = b"[" * 100_000 + b"]" * 100_000  # 200 KB
        r = c.post(GEN, content=nested, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "request body is nested too deeply"
        r = c.post(GEN, content=b'{"prompt": "a cat", "cfg": NaN}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cfg"
        for side, message in ((12000, "12000x12000"), (30000, "900000000 pixels")):
            files = {"image": ("bomb.png", bombs[side].read_bytes(), "image/png")}
            r = c.post("/v1/images/edits", files=files, data={"prompt": "x"})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
            assert "limit of 16777216 pixels" in r.json()["error"]["message"]

        def crash(*args, **kwargs):
            raise RuntimeError("a bug")

        server.job = crash
        r = c.post(GEN, json={"prompt": "a cat"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
        counts = {(e["path"], e["status"]): e["count"] for e in c.get("/metrics").json()["responses"]}
        assert counts[(GEN, 400)] == 2 and counts[("/v1/images/edits", 400)] == 2 and counts[(GEN, 500)] == 1


def test_open_image_takes_paths_bytes_and_files_and_names_what_is_wrong(tmp_path, bombs):
    """The one reader of untrusted images (CLI, server, demo; next the data tools) and its messages."""
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 24), "red").save(good)
    data = good.read_bytes()
    for source in (good, str(good), data, io.BytesIO(data)):
        assert open_image(source).size == (40, 24)
    with pytest.raises(ValueError, match=r"is 40x24 \(960 pixels\), more than the limit of 959 pixels"):
        open_image(data, max_pixels=959)
    with pytest.raises(ValueError, match="cannot decode image"):
        open_image(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not an image format we read"):
        open_image(b"GIF89a but not really")
    with pytest.raises(ValueError, match=r"has 900000000 pixels, more than the limit of 16777216 pixels"):
        open_image(bombs[30000])
