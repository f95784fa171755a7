"""The fused fp8/int8 weight-only linear kernel equals its definition (quantize.reference_linear computed in
float32) within one bf16 rounding of the output: in Triton's CPU interpreter at small shapes (every
candidate launch configuration, split K, K not a multiple of the block), and on CUDA at the 14B decoder's
and flow head's shapes. Skipped where Triton is not installed (the CPU install runs the reference)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from nextstep.sampling import quant_kernels as qk  # noqa: E402
from nextstep.sampling.quantize import MODES, dequantize_weight, quantize_linear  # noqa: E402


def check(got: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """got (M, N) is x @ dequantised q .T + bias within one bf16 ulp of the float32 result (the interpreter
    truncates to bf16, CUDA rounds to nearest and fp32 sums in another order can tip a rounding), plus a
    little for the fp32 sums; and every entry was written (the callers poison outputs with NaN)."""
    exact = x.float() @ dequantize_weight(q, scale).T + (0 if bias is None else bias.float())
    assert got.shape == exact.shape and got.dtype == x.dtype, (got.shape, got.dtype)
    assert not got.isnan().any(), "output not fully written"
    bound = exact.abs() * 2**-7 + 1e-4 * exact.abs().max()
    err = (got.float() - exact).abs()
    assert (err <= bound).all(), (err - bound).max().item()


INTERPRETED = """
import torch
from nextstep.sampling import quant_kernels as qk
from nextstep.sampling.quantize import MODES, quantize_weight
from tests.sampling.test_quant_kernels import check

torch.manual_seed(0)
C = qk.LaunchConfig
cases = [  # (M, N, K, config): split K 1-3, K not a multiple of the block, N not a multiple of the tile
    (1, 48, 80, C(16, 32, 1, 4, 2)),
    (2, 64, 160, C(32, 32, 2, 4, 2)),
    (17, 40, 200, C(16, 64, 3, 4, 2)),
    (64, 96, 256, C(32, 64, 2, 4, 2)),
    (33, 16, 64, C(16, 16, 1, 4, 2)),
]
# Every configuration the tuner may pick, for a weight whose N fills few SMs (so K is split).
tuned = qk.candidates(48, 1100, 16, sms=132) + qk.candidates(48, 1100, 64, sms=132)
assert any(c.split_k > 1 for c in tuned) and len(tuned) == 9, tuned
cases += [(2, 48, 1100, c) for c in tuned[:5]] + [(40, 48, 1100, c) for c in tuned[5:]]
for mode in MODES:
    for i, (m, n, k, config) in enumerate(cases):
        q, scale = quantize_weight(torch.randn(n, k), mode)
        bias = torch.randn(n).bfloat16() if i % 2 == 0 else None
        x = torch.randn(m, k).bfloat16()
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)  # poisoned: every entry must be written
        got = qk.quant_linear(x, q, scale, bias, config=config, out=out)
        assert got.data_ptr() == out.data_ptr()
        check(got, x, q, scale, bias)
print("ok")
"""


def test_kernel_equals_reference_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_row_buckets_and_splits():
    assert [qk.row_bucket(m) for m in (1, 2, 16, 17, 32, 33, 64)] == [16, 16, 16, 32, 32, 64, 64]
    # A 1536-wide head layer splits K to give more of 132 SMs a program; a 27648-wide one does not.
    head = qk.candidates(1536, 1536, 16, sms=132)
    assert any(c.split_k > 1 for c in head)
    assert all(c.split_k == 1 or 1536 // c.split_k >= 2 * c.block_k for c in head)  # >= 2 K steps per slice
    assert all(c.split_k == 1 for c in qk.candidates(27648, 5120, 16, sms=132))
    # K = 64 (the head's input projection): no K step wider than K, and never an empty slice.
    for c in qk.candidates(1536, 64, 64, sms=132):
        assert c.block_k <= 64 and c.split_k * c.block_k <= 64


# The 14B decoder (q/k/v and gate/up fused as the engine runs them), projectors and flow head:
# (N, K, bias).
SHAPES = [
    (7168, 5120, True),  # qkv
    (5120, 5120, False),  # o_proj, image_out_projector (with bias)
    (27648, 5120, False),  # gate_up
    (5120, 13824, False),  # down
    (1536, 1536, True),  # head mlp
    (4608, 1536, True),  # head adaLN
    (1536, 5120, True),  # head cond_embed
    (64, 1536, True),  # head final linear
    (1536, 64, True),  # head input_proj
    (5120, 64, True),  # image_in_projector
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_kernel_equals_reference_gpu(mode):
    """Real shapes, fresh random inputs, poisoned outputs: the untimed default configuration of each row
    bucket at every shape; every candidate (what the tuner may pick) at the shapes that split K; and the
    tuned QuantizedLinear. Compiles stay in the tens (each configuration and K is one Triton compile)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tuner = qk.Tuner()
    for n, k, has_bias in SHAPES:
        linear = torch.nn.Linear(k, n, bias=has_bias, device="cuda", dtype=torch.bfloat16)
        layer = quantize_linear(linear, mode, tuner=tuner)
        for m in (1, 2, 17, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            configs = [qk.default_config(n, k, m, sms)]
            if m == 2 and (n, k) in ((7168, 5120), (5120, 13824), (1536, 5120)):
                configs += qk.candidates(n, k, qk.row_bucket(m), sms)
            for config in configs:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                got = qk.quant_linear(x, layer.weight, layer.scale, layer.bias, config=config, out=out)
                check(got, x, layer.weight, layer.scale, layer.bias)
        if (n, k) == (1536, 1536):  # the tuned path, through the module
            x = torch.randn(2, 3, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            y = layer(x)
            assert y.shape == (2, 3, n)
            check(y.reshape(6, n), x.reshape(6, k), layer.weight, layer.scale, layer.bias)
    assert list(tuner.table) == [(torch.cuda.get_device_name(), str(layer.weight.dtype)[6:], 16, 1536, 1536)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_linear_in_cuda_graph():
    """Tuned before capture, replayed with new inputs: the same as eager (the engine's use)."""
    linear = torch.nn.Linear(5120, 5120, device="cuda", dtype=torch.bfloat16)
    layer = quantize_linear(linear, "fp8")
    x = torch.randn(2, 5120, device="cuda", dtype=torch.bfloat16)
    layer(x)  # tunes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
