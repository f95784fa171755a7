"""Tests for the Streamlit data preview: helpers, the app on a shard folder and on a data config."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nextstep.data.format import Sample, write_shards
from nextstep.data.tools import gen_meta

APP = str(Path(__file__).parents[2] / "nextstep" / "data" / "preview.py")


def _shards(root: Path, name: str, n: int = 6) -> Path:
    image = Image.fromarray(np.full((12, 20, 3), 128, dtype=np.uint8))
    samples = [
        Sample(
            f"{name}{i}",
            ["a cat <image_0>", "<image_0> edit <image_1>", "text only"][i % 3],
            [image] * [1, 2, 0][i % 3],
        )
        for i in range(n)
    ]
    write_shards(samples, root / name, prefix=name, max_count=4)
    gen_meta(root / name)
    return root / name


def test_helpers(tmp_path):
    from nextstep.data.config import DataConfig, DatasetSpec
    from nextstep.data.preview import histogram, load_samples, mixture_table, resolution_counts, sample_kind

    a, b = _shards(tmp_path, "alpha"), _shards(tmp_path, "beta", 3)
    samples, errors = load_samples([str(p) for p in sorted(a.glob("*.tar"))] + [str(tmp_path / "x.tar")], 100)
    assert len(samples) == 6 and len(errors) == 1 and "x.tar" in errors[0]
    assert [sample_kind(s) for s in samples[:3]] == ["text-to-image", "editing", "text-only"]
    assert sum(histogram([len(s.caption) for s in samples], bins=4).values()) == 6
    assert resolution_counts(samples) == {"20x12": 6}
    shard = sorted(a.glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    start = raw.find(b"\x89PNG", raw.find(b"alpha1-0.png"))
    raw[start : start + 40] = b"x" * 40  # one bad image: that sample is listed, the rest of the shard shown
    shard.write_bytes(bytes(raw))
    samples, errors = load_samples([str(shard)], 100)
    assert [s.key for s in samples] == ["alpha0", "alpha2", "alpha3"]
    assert len(errors) == 1 and errors[0].startswith(f"{shard}: cannot read image 0 of sample 'alpha1': not an image")
    cfg = DataConfig(datasets=[DatasetSpec(shards=str(a), weight=3), DatasetSpec(shards=str(b), name="b")])
    rows = mixture_table(cfg)
    assert [(r["share"], r["shards"], r["samples"]) for r in rows] == [(0.75, 2, 6), (0.25, 1, 3)]


def test_app_on_folder_and_config(tmp_path, monkeypatch):
    testing = pytest.importorskip("streamlit.testing.v1")
    a, b = _shards(tmp_path, "alpha"), _shards(tmp_path, "beta", 3)
    monkeypatch.setattr(sys, "argv", [APP, str(a)])
    at = testing.AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert any("6 samples from 2 shard(s)" in h.value for h in at.header)
    assert len(at.get("imgs")) > 0 or len(at.get("image")) > 0
    assert any("a cat" in t.value for t in at.text)

    config = tmp_path / "mix.json"
    config.write_text(json.dumps({"datasets": [{"shards": str(a), "weight": 1}, {"shards": str(b), "weight": 3}]}))
    at.sidebar.text_input[0].input(str(config)).run()
    assert not at.exception
    shares = at.dataframe[0].value["share"].tolist()
    assert shares == [0.25, 0.75]

    at.sidebar.text_input[0].input(str(tmp_path / "nothing")).run()
    assert not at.exception and "nothing" in at.error[0].value  # missing shard: listed, no crash


@pytest.mark.slow
def test_headless_chromium_screenshot(tmp_path):
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("needs /usr/bin/chromium")
    pytest.importorskip("streamlit")
    import socket
    import time
    import urllib.request

    a = _shards(tmp_path, "alpha")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        APP,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
    ]
    server = subprocess.Popen(cmd + ["--", str(a)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        shot = tmp_path / "shot.png"
        browse = [str(chromium), "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"]
        url = f"http://127.0.0.1:{port}"
        # First visit runs the script once (imports); its real-time cost is not covered by virtual time.
        subprocess.run(browse + ["--virtual-time-budget=30000", "--dump-dom", url], timeout=120, capture_output=True)
        for _ in range(3):  # a busy machine can still be running the script at the first capture
            time.sleep(10)
            subprocess.run(
                browse + ["--virtual-time-budget=60000", f"--screenshot={shot}", url],
                check=True,
                timeout=120,
                capture_output=True,
            )
            image = np.asarray(Image.open(shot).convert("L"))
            if image.std() > 5:
                break
        assert image.shape == (1600, 1280) and image.std() > 5  # rendered something, not a blank page
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_launcher_binds_to_localhost_and_sends_no_usage_statistics(monkeypatch):
    from nextstep.data import preview

    calls = []
    monkeypatch.setattr(preview.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert preview.main_preview(["shards/", "--port", "9000"]) == 0
    assert preview.main_preview(["--host", "0.0.0.0"]) == 0

    def flags(cmd: list[str]) -> dict[str, str]:
        return dict(zip(cmd[5:-2:2], cmd[6:-2:2], strict=True))

    assert calls[0][:5] == [sys.executable, "-m", "streamlit", "run", APP] and calls[0][-2:] == ["--", "shards/"]
    assert flags(calls[0]) == {
        "--server.port": "9000",
        "--server.address": "localhost",
        "--browser.gatherUsageStats": "false",
    }
    assert flags(calls[1])["--server.address"] == "0.0.0.0" and flags(calls[1])["--browser.gatherUsageStats"] == "false"
