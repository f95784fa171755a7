"""The CPU-runnable parts of bench/decode.py and bench/quant_quality.py: roofline bytes per precision, the
per-depth quantisation errors on the tiny shape, PSNR, and a cold-start run of two fresh processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench.decode import build_model, num_bytes
from bench.quant_quality import depth_errors, psnr
from nextstep.model.backbone import fuse_projections

ROOT = Path(__file__).resolve().parents[2]


def test_roofline_bytes_are_the_stored_weights_of_each_precision():
    """The engine's fused q/k/v and gate/up copies are not weights the decode step must read twice; fp8
    weights count 1 byte each plus a float32 scale per output channel."""
    model = build_model("tiny", "none", device="cpu")
    before = num_bytes(model.layers)
    assert fuse_projections(model.layers) and model.layers[0].mlp.gate_up_proj is not None
    assert num_bytes(model.layers) == before
    fp8 = build_model("tiny", "fp8", device="cpu")
    linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    norms = sum(p.numel() * 2 for n, p in model.layers.named_parameters() if "norm" in n)
    expected = sum(m.weight.numel() + 4 * m.out_features + 2 * (m.bias is not None) * m.out_features for m in linears)
    assert num_bytes(fp8.layers) == expected + norms


def test_depth_errors_on_the_tiny_shape(capsys):
    """One mean and one max line per layer depth and mode, then the velocity errors; every error is small but
    not zero, and int8 (127 steps per channel) beats e4m3 (3 mantissa bits) at every depth."""
    depth_errors("tiny", "cpu", tokens=8, seed=0)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    hidden = {(r["config"]["quantize"], r["config"]["depth"]): r["number"] for r in rows
              if r["what"] == "hidden_state_relative_error_mean"}  # fmt: skip
    assert sorted({d for _, d in hidden}) == [1, 2, 3, 4]
    for depth in range(1, 5):
        assert 0 < hidden["int8", depth] < hidden["fp8", depth] < 0.1
    velocity = [r for r in rows if r["what"].startswith("velocity_relative_error")]
    assert len(velocity) == 8 and all(0 < r["number"] < 0.5 and r["unit"] == "ratio" for r in velocity)


def test_psnr():
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    assert psnr(a, a) is None
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE 255^2 / 96
    assert math.isclose(psnr(a, b), 10 * math.log10(96))


def test_cold_start_runs_two_fresh_processes():
    """Cold then warm caches, each reporting first image, steady image and their difference, in seconds, and the
    phases that difference is made of."""
    argv = [
        "--cold-start",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "32",
        "--steps",
        "1",
        "--cache-env",
        "X_CACHE",
    ]
    r = subprocess.run(
        [sys.executable, "bench/decode.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    phases = ["process_and_imports", "model", "engine", "first_call_minus_steady"]
    assert [(row["what"], row["config"]["caches"], row["config"].get("phase")) for row in rows] == [
        (what, caches, phase)
        for caches in ("cold", "warm")
        for what, phase in [
            ("cold_start_first_image", None),
            ("cold_start_steady_image", None),
            ("cold_start_first_minus_steady", None),
            *(("cold_start_phase", p) for p in phases),
        ]
    ]
    assert rows[0]["config"]["cache_env"][-1] == "X_CACHE"
    for run in (rows[:7], rows[7:]):
        first, steady, diff, *parts = run
        assert first["number"] > steady["number"] > 0
        assert math.isclose(diff["number"], first["number"] - steady["number"])
        assert parts[0]["number"] > 0 and parts[1]["number"] > 0  # a process start and a model take time
        assert math.isclose(sum(p["number"] for p in parts), diff["number"], abs_tol=1e-5)
