"""singlegpu_debug / multigpu_debug: they start, each rank listens on port + rank while the run goes on, and the
run completes with no client attached."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nextstep.data.format import Sample, write_shards
from nextstep.debug import launch_json, parse, say

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_and_probe(entry: str, args: list[str], tmp_path: Path) -> tuple[int, list[int], str]:
    """Run `entry(args)` (a nextstep.debug function) in a fresh interpreter; each time a rank reports that it
    listens, connect to its port while the run goes on. Returns (exit code, ports connected to, stderr)."""
    code = f"import sys; from nextstep.debug import {entry}; sys.exit({entry}(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout.txt", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.PIPE, text=True
        )
        connected, err = [], []
        for line in proc.stderr:
            err.append(line)
            for m in re.finditer(r"listening on [^ ]+:(\d+) ", line):
                with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10):
                    connected.append(int(m.group(1)))
        return proc.wait(timeout=300), sorted(connected), "".join(err)


@pytest.fixture
def preset_args(tmp_path) -> list[str]:
    """configs.debug for 2 steps on a few generated 32x32 images."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    write_shards([Sample(f"s{i}", "a red cat <image_0>", [im]) for i, im in enumerate(images)], tmp_path / "shards")
    return [
        "-m",
        "configs.debug",
        f"data.datasets={json.dumps([{'shards': str(tmp_path / 'shards')}])}",
        "data.image_size=32",
        "training.max_steps=2",
        "training.save_steps=2",
        f"training.output_dir={tmp_path / 'run'}",
        "logging.progress=false",
    ]


def test_parse_builds_the_nextstep_command():
    args, command = parse(["--wait", "-m", "configs.debug", "training.max_steps=3"], "singlegpu_debug", multi=False)
    assert args.wait and args.port == 5678 and command == ["train", "-m", "configs.debug", "training.max_steps=3"]
    args, command = parse(["--port", "6000", "--", "generate", "a cat", "--steps", "2"], "x", multi=True)
    assert not args.wait and args.port == 6000 and command == ["generate", "a cat", "--steps", "2"]
    for bad in ([], ["-m", "configs.debug", "--", "config", "show", "debug"], ["--"]):
        with pytest.raises(SystemExit):
            parse(bad, "singlegpu_debug", multi=False)
    configs = json.loads(launch_json("127.0.0.1", [5678, 5679]))["configurations"]
    assert [c["connect"]["port"] for c in configs] == [5678, 5679] and configs[0]["request"] == "attach"


def test_singlegpu_debug_trains_while_listening(preset_args, tmp_path):
    port = free_port()
    rc, connected, err = run_and_probe("main_single", ["--port", str(port), *preset_args], tmp_path)
    assert rc == 0, err[-3000:]
    assert connected == [port]
    assert f'"port": {port}' in err  # the launch.json snippet
    assert (tmp_path / "run/checkpoints/step-00000002").is_dir()


def test_singlegpu_debug_runs_any_nextstep_command(tmp_path):
    port = free_port()
    rc, connected, err = run_and_probe("main_single", ["--port", str(port), "--", "config", "show", "debug"], tmp_path)
    assert rc == 0, err[-3000:]
    assert connected == [port]
    assert json.loads((tmp_path / "stdout.txt").read_text())["training"]["output_dir"] == "runs/debug"


@pytest.mark.slow
def test_multigpu_debug_listens_on_port_plus_rank(preset_args, tmp_path):
    port = free_port()
    args = ["--nproc-per-node", "2", "--port", str(port), *preset_args]
    rc, connected, err = run_and_probe("main_multi", args, tmp_path)
    assert rc == 0, err[-3000:]
    assert connected == [port, port + 1]
    assert (tmp_path / "run/checkpoints/step-00000002").is_dir()


def test_a_rank_line_is_one_write(monkeypatch):
    """Ranks share one stderr pipe: a line written in two writes (text, then newline, as print() does on stderr)
    can end up joined to another rank's line, and the port in it unread."""
    writes = []
    monkeypatch.setattr(sys, "stderr", type("Err", (), {"write": writes.append, "flush": lambda self: None})())
    say("debug: rank 1 listening on 127.0.0.1:5679 (running, attach any time)")
    assert writes == ["debug: rank 1 listening on 127.0.0.1:5679 (running, attach any time)\n"]
