"""Weight-only fp8/int8 quantisation on CPU: per-element round-trip bounds, per-channel scales, zero rows,
bias, the output error on random weights, and QuantizedLinear (the reference path off CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nextstep.sampling import quant_kernels
from nextstep.sampling.quantize import (
    MODES,
    QuantizedLinear,
    apply_quantization,
    concat_quantized,
    dequantize_weight,
    fuse_quantized,
    quantize_linear,
    quantize_linears,
    quantize_weight,
    reference_linear,
)

QMAX = {"fp8": 448.0, "int8": 127.0}


def _weights(n: int = 96, k: int = 200, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, so one shared scale would fail the per-channel bounds."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_within_format_bounds(mode):
    w = _weights()
    q, scale = quantize_weight(w, mode)
    assert q.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[mode] and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    err = (dequantize_weight(q, scale) - w).abs()
    s = scale[:, None]
    if mode == "int8":  # integer rounding: half a step of each row's scale
        bound = 0.5 * s * (1 + 1e-5)
    else:  # e4m3: 3 mantissa bits (half an ulp: 2^-4 relative), subnormal spacing 2^-9 below 2^-6
        bound = w.abs() * 2**-4 + s * 2**-10
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("mode", MODES)
def test_scale_is_per_channel_absmax(mode):
    w = _weights()
    q, scale = quantize_weight(w, mode)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / QMAX[mode])
    assert (q.float().abs().amax(dim=1) == QMAX[mode]).all()  # each row's largest entry uses the full range
    # Scaling one row scales only its scale; the codes stay the same.
    w2 = w.clone()
    w2[3] *= 1000
    q2, scale2 = quantize_weight(w2, mode)
    assert torch.equal(q2.float(), q.float())
    torch.testing.assert_close(scale2[3], scale[3] * 1000)
    torch.testing.assert_close(scale2[4:], scale[4:], rtol=0, atol=0)


class _ReciprocalDivision(torch.overrides.TorchFunctionMode):
    """Division by a Python number as PyTorch's CUDA kernels do it: a product with its float32 reciprocal."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div) and isinstance(args[1], (int, float)):
            return args[0] * (1.0 / args[1])
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_weights_do_not_depend_on_how_the_device_divides(mode):
    """`nextstep quantize` runs on CPU, quantize= at load on CUDA: both must give the same bytes. CUDA divides by
    a Python number as a product with its reciprocal (one ulp off for many rows), so no such division may
    reach the result."""
    w = _weights(n=512)
    q, scale = quantize_weight(w, mode)
    with _ReciprocalDivision():
        q_cuda, scale_cuda = quantize_weight(w, mode)
        assert not torch.equal(w[:, :1] / 3.0, w[:, :1] / torch.full_like(w[:, :1], 3.0))  # the mode is active
    assert torch.equal(scale_cuda, scale) and torch.equal(q_cuda.float(), q.float())


@pytest.mark.parametrize("mode", MODES)
def test_zero_rows_and_bias(mode):
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[5] = 0
        linear.weight[31] = 0
    layer = quantize_linear(linear, mode)
    assert layer.scale[5] == 1 and not layer.weight[5].float().any()
    assert torch.isfinite(layer.scale).all() and torch.isfinite(layer.weight.float()).all()
    x = torch.randn(7, 64)
    y = layer(x)
    torch.testing.assert_close(y[:, 5], linear.bias[5].expand(7))  # the zero channel outputs its bias
    assert torch.isfinite(y).all()
    torch.testing.assert_close(layer.bias, linear.bias.detach())
    no_bias = quantize_linear(nn.Linear(64, 32, bias=False), mode)
    assert no_bias.bias is None and no_bias(x).shape == (7, 32)


@pytest.mark.parametrize(("mode", "tolerance"), [("fp8", 0.035), ("int8", 0.006)])
def test_output_error_on_random_weights(mode, tolerance):
    """Relative output error against the float32 linear, nn.Linear's uniform init as in bench/quant_linear.py,
    where torchao's weight-only configs measured 0.026 (fp8) and 0.0045 (int8) on the 14B shapes. (int8's
    error is set by the step absmax / 127: about 0.004 for uniform rows, 0.008 for Gaussian ones.)"""
    torch.manual_seed(1)
    linear = nn.Linear(1024, 512)
    x = torch.randn(16, 1024)
    want = linear(x)
    got = quantize_linear(linear, mode)(x)
    err = ((got - want).norm() / want.norm()).item()
    assert err < tolerance, err


def test_outliers_do_not_overflow_fp8():
    """The largest entry of a row maps to 448 exactly; the e4m3 cast would make anything larger NaN."""
    w = torch.randn(4, 300)
    w[0, 7] = 3e4
    w[2, 0] = -1e-30
    q, scale = quantize_weight(w, "fp8")
    assert torch.isfinite(q.float()).all() and q.float()[0, 7] == 448
    torch.testing.assert_close(dequantize_weight(q, scale)[0, 7], torch.tensor(3e4))


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="'int4'"):
        quantize_linear(nn.Linear(4, 4), "int4")


@pytest.mark.parametrize("mode", MODES)
def test_quantized_linear_is_the_reference_off_cuda(mode):
    linear = nn.Linear(48, 40).to(torch.bfloat16)
    layer = quantize_linear(linear, mode)
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)  # (B, L, K): leading dimensions kept
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert torch.equal(y, reference_linear(x, layer.weight, layer.scale, layer.bias))
    state = layer.state_dict()
    assert set(state) == {"weight", "scale", "bias"} and state["scale"].dtype == torch.float32


def test_quantize_linears_shares_one_tuner():
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)))
    x = torch.randn(5, 16)
    want = model(x)
    tuner = quant_kernels.Tuner()
    assert quantize_linears(model, "int8", tuner=tuner) == 3
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 3 and all(m.tuner is tuner for m in layers)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    got = model(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02


@pytest.mark.parametrize("bias", [True, False])
def test_concat_quantized_is_outputs_side_by_side(bias):
    parts = [quantize_linear(nn.Linear(24, n, bias=bias), "fp8") for n in (16, 8, 8)]
    fused = concat_quantized(parts)
    x = torch.randn(3, 24)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-6, atol=1e-6)
    assert fused.out_features == 32 and fused.tuner is parts[0].tuner


def test_concat_quantized_rejects_mixed_bias():
    parts = [quantize_linear(nn.Linear(8, 8, bias=b), "int8") for b in (True, False)]
    with pytest.raises(ValueError, match="bias"):
        concat_quantized(parts)


def _model(dtype=torch.float32):
    from nextstep.model.checkpoint import from_pretrained
    from tests.refs import reference_dirs

    dirs = reference_dirs()
    if not dirs:
        pytest.skip("reference checkpoints not found")
    return from_pretrained(dirs[0]).to(dtype).eval()


@pytest.mark.parametrize("mode", MODES)
def test_fused_quantized_projections_equal_unfused(mode):
    """fuse_quantized runs q/k/v and gate/up as one QuantizedLinear each: the hidden states equal the
    unfused quantised path's, the state_dict (names and values) is that of the unfused model, and the fused
    weights are the layers' own memory (views), so load_state_dict writes through to them."""
    model = _model()
    apply_quantization(model, mode)
    state = model.state_dict()
    assert model.layers[0].self_attn.qkv_proj is None  # fused by the engine: until then no tensor shares memory
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == len(state)
    assert fuse_quantized(model.layers)
    a, m = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(a.qkv_proj, QuantizedLinear) and isinstance(m.gate_up_proj, QuantizedLinear)
    assert a.qkv_proj.out_features == a.q_proj.out_features + 2 * a.k_proj.out_features
    assert a.k_proj.weight.data_ptr() == a.qkv_proj.weight[a.q_proj.out_features :].data_ptr()
    assert m.up_proj.scale.data_ptr() == m.gate_up_proj.scale[m.gate_proj.out_features :].data_ptr()
    embeds = torch.randn(2, 5, model.config.hidden_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in state)
    with torch.no_grad():
        fused = model.forward_hidden(embeds)
        fused_modules = [(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for layer in model.layers]
        for layer in model.layers:
            layer.self_attn.qkv_proj = layer.mlp.gate_up_proj = None
        assert list(model.state_dict()) == list(state)
        unfused = model.forward_hidden(embeds)
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
        assert fuse_quantized(model.layers)  # fuses again; a second call keeps the same fused modules
        again = [(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for layer in model.layers]
        assert fuse_quantized(model.layers)
        assert [(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for layer in model.layers] == again
        assert again[0][0] is not fused_modules[0][0]
        # New values through the official names reach the fused kernel's weights.
        state["layers.0.self_attn.v_proj.scale"] *= 2
        model.load_state_dict(state)
        v_rows = slice(a.q_proj.out_features + a.k_proj.out_features, None)
        torch.testing.assert_close(
            model.layers[0].self_attn.qkv_proj.scale[v_rows], state["layers.0.self_attn.v_proj.scale"]
        )
        # An assigning load gives the layers new memory: the stale fused copy is rebuilt, and again shares it.
        state["layers.0.self_attn.v_proj.scale"] /= 2  # the weights `unfused` was computed with
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        stale = model.layers[0].mlp.gate_up_proj
        assert fuse_quantized(model.layers) and model.layers[0].mlp.gate_up_proj is not stale
        assert (
            model.layers[0].mlp.up_proj.weight.data_ptr()
            == model.layers[0].mlp.gate_up_proj.weight[model.layers[0].mlp.gate_proj.out_features].data_ptr()
        )
        torch.testing.assert_close(model.forward_hidden(embeds), unfused, rtol=1e-5, atol=1e-5)


def test_fuse_quantized_needs_quantized_layers():
    model = _model()
    assert not fuse_quantized(model.layers)  # float layers: fuse_projections' job
    assert model.layers[0].self_attn.qkv_proj is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_fused_quantized_projections_equal_unfused_gpu(mode):
    """On CUDA the fused q/k/v and gate/up run the fp8/int8 GEMM at other N (and tuned launches) than the
    separate ones: bf16 hidden states equal within bf16 rounding, at decode (2 rows) and prefill rows."""
    model = _model().to("cuda", torch.bfloat16)
    apply_quantization(model, mode)
    assert fuse_quantized(model.layers)
    for rows, length in ((2, 1), (2, 9)):
        embeds = torch.randn(rows, length, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fused = model.forward_hidden(embeds).float()
            saved = [(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for layer in model.layers]
            for layer in model.layers:
                layer.self_attn.qkv_proj = layer.mlp.gate_up_proj = None
            unfused = model.forward_hidden(embeds).float()
            for layer, (qkv, gate_up) in zip(model.layers, saved, strict=True):
                layer.self_attn.qkv_proj, layer.mlp.gate_up_proj = qkv, gate_up
        err = ((fused - unfused).norm() / unfused.norm()).item()
        assert err < 1e-2, (rows, length, err)
