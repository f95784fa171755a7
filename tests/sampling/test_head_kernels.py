"""Fused Triton head kernels: equal to the torch head (CPU, Triton's interpreter) and to the eager pipeline
through the engine; on CUDA the same within bf16 tolerance. Skipped where Triton is not installed (the CPU
install has no Triton: there the engine never uses these kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.refs import ROOT

triton = pytest.importorskip("triton")

REFERENCE = ROOT

INTERPRETED = r"""
import sys, torch
from nextstep.model.head import AdaLNMLP
from nextstep.sampling import head_kernels as hk
from nextstep.sampling.engine import Engine, head_velocity, step_modulations

torch.manual_seed(0)
net = AdaLNMLP(16, 40, 48, 3)  # width 48: not a multiple of the 16-column tiles
for p in net.parameters():
    torch.nn.init.normal_(p, std=0.2)
with torch.no_grad():
    for batch, rows in ((1, 1), (1, 2), (3, 2), (2, 3)):
        r = batch * rows
        mods = step_modulations(net, net.time_embed(torch.rand(5)), torch.randn(r, 40))
        x = torch.randn(batch, 16)
        for i in (0, 4):
            want = head_velocity(net, x, mods[i], rows)
            got = hk.velocity(net, x, mods[i], rows)
            assert got.shape == want.shape == (r, 16), got.shape
            err = (got - want).abs().max().item()
            assert err < 1e-4 * want.abs().max().item() + 1e-5, (batch, rows, i, err)
    try:
        hk.modulated_linear(torch.zeros(hk.MAX_ROWS + 1, 48), net.res_blocks[0].in_ln, torch.zeros(hk.MAX_ROWS + 1, 48),
                            torch.zeros(hk.MAX_ROWS + 1, 48), net.res_blocks[0].mlp[0], silu=True)
        raise SystemExit("no error for too many rows")
    except ValueError as e:
        assert str(hk.MAX_ROWS + 1) in str(e), e

# The whole engine with fused head kernels equals the eager pipeline (fp32, tiny reference checkpoint).
sys.path.insert(0, sys.argv[2])
from test_engine import inputs  # noqa: E402
from nextstep.sampling.pipeline import GenerateOptions, Pipeline  # noqa: E402

pipe = Pipeline.from_pretrained(sys.argv[1])
cases = [  # 2-way guidance with SDE noise; 3-way (edit) guidance, normalised, ODE
    (dict(sampler="sde", cfg=3.0), False),
    (dict(sampler="ode", cfg=3.0, cfg_img=1.5, cfg_normalize=True), True),
]
for extra, edit in cases:
    opts = GenerateOptions(size=(32, 32), steps=3, **extra)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox"], edit)
    eager = pipe.generate_tokens(ids, mask, latents, settings, opts, seed=3)
    engine = Engine(pipe.model, head_kernels=True)
    fast = engine.generate(ids, mask, latents, settings, opts, n_tokens=4, seed=3)
    assert engine._state.head_kernels and engine._state.velocity.func is hk.velocity
    assert engine._state.launch == hk.LaunchConfig()  # off CUDA the engine keeps the default, untuned
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_fused_head_equals_torch_head_interpreted():
    path = REFERENCE / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", INTERPRETED, str(path), here], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_head_matches_torch_head_gpu():
    """bf16 on CUDA: the engine with fused head kernels against the engine with torch ops, same draws."""
    from nextstep.sampling.engine import Engine
    from nextstep.sampling.pipeline import GenerateOptions
    from tests.sampling.test_engine import inputs, load

    pipe = load("nextstep11", "cuda")
    opts = GenerateOptions(size=(64, 64), steps=8, cfg=3.0, sampler="sde")
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox in snow"])
    outs = []
    for fused in (False, True):
        engine = Engine(pipe.model, head_kernels=fused)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=16, seed=0))
        assert engine._state.head_kernels == fused
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    first = ((outs[1][:, 0] - outs[0][:, 0]).norm() / outs[0][:, 0].norm()).item()
    assert first < 2e-2 and err < 5e-2, (first, err)
