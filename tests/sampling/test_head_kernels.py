"""Fused Triton head kernels: equal to the torch head (CPU, Triton's interpreter) and to the eager pipeline
through the engine, at a few rows (broadcast multiply) and at 16-64 rows (tl.dot, odd counts for the masks);
with fp8/int8 weights equal to the dequantised reference (the torch head over QuantizedLinear); on CUDA the
same within bf16 tolerance. Skipped where Triton is not installed (the CPU install has no Triton: there the
engine never uses these kernels)."""

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
from nextstep.sampling import update_kernel
from nextstep.sampling.engine import Engine, head_velocity, step_modulations
from nextstep.sampling.flow import guided_update

torch.manual_seed(0)
net = AdaLNMLP(16, 40, 48, 3)  # width 48: not a multiple of the 16-column tiles
for p in net.parameters():
    torch.nn.init.normal_(p, std=0.2)
with torch.no_grad():
    # a few rows (broadcast multiply); 16, 33 and 64 rows (tl.dot, rows padded to 16/64 and masked)
    for batch, rows in ((1, 1), (1, 2), (3, 2), (2, 3), (8, 2), (11, 3), (32, 2)):
        r = batch * rows
        mods = step_modulations(net, net.time_embed(torch.rand(5)), torch.randn(r, 40))
        x = torch.randn(batch, 16)
        for i in (0, 4):
            want = head_velocity(net, x, mods[i], rows)
            got = hk.velocity(net, x, mods[i], rows)
            assert got.shape == want.shape == (r, 16), got.shape
            err = (got - want).abs().max().item()
            assert err < 1e-4 * want.abs().max().item() + 1e-5, (batch, rows, i, err)
    for batch, rows in ((32, 2), (21, 3)):  # the guidance update of 64 and 63 rows
        x, v, eps = torch.randn(batch, 16), torch.randn(rows * batch, 16), torch.randn(batch, 16)
        scales = torch.tensor([3.0, 1.5])
        for normalize in (False, True):
            want = guided_update(x, v, scales, eps, 0.9, 0.1, rows=rows, normalize=normalize)
            got = update_kernel.guided_update(x, v, scales, eps, 0.9, 0.1, rows=rows, normalize=normalize)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
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
cases = [  # 2-way guidance with SDE noise; 3-way (edit) guidance, normalised, ODE; images for > 8 rows
    (dict(sampler="sde", cfg=3.0), False, 8),
    (dict(sampler="ode", cfg=3.0, cfg_img=1.5, cfg_normalize=True), True, 11),
]
for extra, edit, _ in cases:
    opts = GenerateOptions(size=(32, 32), steps=3, **extra)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox"], edit)
    eager = pipe.generate_tokens(ids, mask, latents, settings, opts, seed=3)
    engine = Engine(pipe.model, head_kernels=True)
    fast = engine.generate(ids, mask, latents, settings, opts, n_tokens=4, seed=3)
    assert engine._state.head_kernels and engine._state.velocity.func is hk.velocity
    assert engine._state.launch == hk.LaunchConfig()  # off CUDA the engine keeps the default, untuned
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)

# More than 8 rows (tl.dot): 8 images with 2-way guidance (16 rows), 11 edits with 3-way guidance (33 rows);
# the fused engine equals the engine with the torch head.
captions = [f"prompt {i} about a fox" + " in snow" * (i % 3) for i in range(11)]
for extra, edit, n in cases:
    opts = GenerateOptions(size=(32, 32), steps=3, **extra)
    ids, mask, latents, settings = inputs(pipe, opts, captions[:n], edit)
    outs = []
    for fused in (False, True):
        engine = Engine(pipe.model, head_kernels=fused)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=3, seed=3))
        assert engine._state.head_kernels == fused
    r = engine._state.key.rows * engine._state.key.batch
    assert r == (3 if edit else 2) * n and engine._state.launch == hk.default_config(r) != hk.LaunchConfig()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
print("ok")
"""


QUANTIZED = r"""
import sys, torch
from nextstep.model.head import AdaLNMLP
from nextstep.sampling import head_kernels as hk, quant_kernels
from nextstep.sampling.engine import Engine, head_velocity, step_modulations
from nextstep.sampling.quantize import MODES, apply_quantization, quantize_linears

torch.manual_seed(0)
for mode in MODES:
    net = AdaLNMLP(16, 40, 48, 3)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    quantize_linears(net, mode, tuner=quant_kernels.Tuner())
    assert net.res_blocks[0].mlp[0].weight.element_size() == 1
    with torch.no_grad():
        for batch, rows in ((1, 2), (3, 1), (8, 2), (11, 3), (32, 2)):
            r = batch * rows
            mods = step_modulations(net, net.time_embed(torch.rand(5)), torch.randn(r, 40))
            x = torch.randn(batch, 16)
            want = head_velocity(net, x, mods[2], rows)  # QuantizedLinear off CUDA: the dequantised reference
            got = hk.velocity(net, x, mods[2], rows)
            err = (got - want).abs().max().item()
            assert err < 1e-4 * want.abs().max().item() + 1e-5, (mode, batch, rows, err)

# The engine keeps its fused head on a quantised model and equals the engine with the torch head.
sys.path.insert(0, sys.argv[2])
from test_engine import inputs  # noqa: E402
from nextstep.sampling.pipeline import GenerateOptions, Pipeline  # noqa: E402

pipe = Pipeline.from_pretrained(sys.argv[1])
apply_quantization(pipe.model, "fp8")
opts = GenerateOptions(size=(32, 32), steps=3, sampler="sde", cfg=3.0)
for captions in (["a fox"], [f"fox {i}" for i in range(9)]):  # 2 rows; 18 rows (tl.dot)
    ids, mask, latents, settings = inputs(pipe, opts, captions, False)
    outs = []
    for fused in (False, True):
        engine = Engine(pipe.model, head_kernels=fused)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=3, seed=3))
        assert engine._state.head_kernels == fused
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
print("ok")
"""


def _interpret(script: str) -> None:
    path = REFERENCE / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), here], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_fused_head_equals_torch_head_interpreted():
    _interpret(INTERPRETED)


def test_fused_quantized_head_equals_dequantized_reference_interpreted():
    """fp32 head, fp8 and int8 weights: the kernels' (sum of a * W_q) * scale against F.linear with the
    dequantised weight, within fp32 rounding (1e-4 of the largest velocity)."""
    _interpret(QUANTIZED)


CAPTIONS = [f"prompt {i}: a fox" + " in snow" * (i % 4) for i in range(32)]


def test_tuner_candidates_per_row_count():
    """Up to 8 rows the broadcast launches as before; above, tiles tl.dot takes (16+ columns and K), pipelined,
    no 256-wide K step at 32-64 rows (shared memory); the untuned default is one of them."""
    from nextstep.sampling import head_kernels as hk

    small = hk.candidates(8, 1536)
    assert {c.block_n for c in small} == {2, 4, 8, 16} and {c.num_stages for c in small} == {3}
    for rows in (9, 16, 33, 64):
        found = hk.candidates(rows, 1536)
        assert all(c.block_n >= 16 and c.block_k >= 16 for c in found) and len(set(found)) == len(found)
        assert {c.num_stages for c in found} == {3, 4} and {c.num_warps for c in found} == {4, 8}
        assert max(c.block_k for c in found) == (256 if rows <= 16 else 128)
    for rows in (1, 8, 9, 64):
        assert hk.default_config(rows) in hk.candidates(rows, 1536)


def fused_against_torch_head(pipe, opts, images: int) -> tuple[float, float]:
    """The engine's tokens with fused head kernels against its torch head, same draws, for `images` captions:
    relative error of the first token and of all 16."""
    from nextstep.sampling.engine import Engine
    from tests.sampling.test_engine import inputs

    ids, mask, latents, settings = inputs(pipe, opts, CAPTIONS[:images])
    outs = []
    for fused in (False, True):
        engine = Engine(pipe.model, head_kernels=fused)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=16, seed=0))
        assert engine._state.head_kernels == fused
    first = ((outs[1][:, 0] - outs[0][:, 0]).norm() / outs[0][:, 0].norm()).item()
    return first, ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("images", [2, 32])
def test_fused_head_matches_torch_head_gpu(images):
    """bf16 on CUDA: the engine with fused head kernels against the engine with torch ops, same draws; 4 rows
    (broadcast multiply) and 64 rows (batch 32 with guidance: tl.dot)."""
    from nextstep.sampling.pipeline import GenerateOptions
    from tests.sampling.test_engine import load

    pipe = load("nextstep11", "cuda")
    opts = GenerateOptions(size=(64, 64), steps=8, cfg=3.0, sampler="sde")
    first, err = fused_against_torch_head(pipe, opts, images)
    assert first < 2e-2 and err < 5e-2, (first, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["none", "fp8", "int8"])
def test_fused_head_14b_shape_gpu(mode):
    """The 14B head's shape (width 1536, 12 blocks, 64-dim tokens, 5120-dim condition) in bf16 with float or
    fp8/int8 weights: the fused kernels (tuned launch) against the torch head (with fp8/int8: over the same
    QuantizedLinears, the dequantised reference run by the fp8/int8 GEMM), 2, 8 and 64 rows, within bf16
    rounding; and the engine on the tiny checkpoint at batch 2 and 32 keeps its fused head (quantised too),
    matching its torch head."""
    from nextstep.model.head import AdaLNMLP
    from nextstep.sampling import head_kernels as hk
    from nextstep.sampling import quant_kernels
    from nextstep.sampling.engine import Engine, head_velocity, step_modulations
    from nextstep.sampling.pipeline import GenerateOptions, Pipeline
    from nextstep.sampling.quantize import quantize_linears

    torch.manual_seed(0)
    net = AdaLNMLP(64, 5120, 1536, 12).to("cuda", torch.bfloat16)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.03)
    if mode != "none":
        quantize_linears(net, mode, tuner=quant_kernels.Tuner())
    with torch.no_grad():
        for batch, rows in ((1, 2), (4, 2), (32, 2)):
            r = batch * rows
            t_embed = net.time_embed(torch.rand(30, device="cuda"))
            mods = step_modulations(net, t_embed, torch.randn(r, 5120, device="cuda", dtype=torch.bfloat16))
            x = torch.randn(batch, 64, device="cuda")
            config = hk.tune(net, r, torch.device("cuda"))
            for i in (0, 29):
                want = head_velocity(net, x, mods[i], rows)
                got = hk.velocity(net, x, mods[i], rows, config=config).float()
                err = ((got - want).norm() / want.norm()).item()
                assert err < 2e-2, (batch, rows, i, err)

    path = REFERENCE / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    pipe = Pipeline.from_pretrained(path, device="cuda", quantize=mode)
    assert Engine(pipe.model).head_kernels  # the default keeps the fused head on a quantised model
    opts = GenerateOptions(size=(64, 64), steps=8, cfg=3.0, sampler="sde")
    for images in (2, 32):
        first, err = fused_against_torch_head(pipe, opts, images)
        assert first < 2e-2 and err < 5e-2, (images, first, err)
