"""Programmatic dependent launch (nextstep.sampling.pdl): where it is supported, the engine switch (off by default,
a clear error where it cannot run, passed down to every decode kernel), and on an SM90+ GPU the same tokens and
kernel outputs with it as without (a missing wait would read half-written activations: far beyond bf16 rounding)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from nextstep.sampling import head_kernels as head_kernels_mod
from nextstep.sampling import layer_kernels as layer_kernels_mod
from nextstep.sampling import pdl as pdl_mod
from nextstep.sampling.engine import Engine
from nextstep.sampling.pipeline import GenerateOptions, Pipeline
from nextstep.sampling.quantize import QuantizedLinear, apply_quantization, fuse_quantized, set_pdl
from tests.sampling.test_engine import REFERENCE, inputs, load


def test_supported_needs_sm90_cuda_and_no_interpreter(monkeypatch):
    cuda = torch.device("cuda")
    assert not pdl_mod.supported(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter cannot run griddepcontrol, whatever the device
    assert not pdl_mod.supported(cuda)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(pdl_mod, "gdc_wait", object())  # as if Triton with grid dependency control were installed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not pdl_mod.supported(cuda)  # A100: no griddepcontrol
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl_mod.supported(cuda)
    monkeypatch.setattr(pdl_mod, "gdc_wait", None)  # no Triton, or one before grid dependency control
    assert not pdl_mod.supported(cuda)


def test_engine_pdl_off_by_default_and_refused_where_it_cannot_run(monkeypatch):
    pipe = load("nextstep11")
    assert not Engine(pipe.model).pdl
    with pytest.raises(ValueError, match="pdl=True needs Triton and a CUDA device of compute capability 9.0"):
        Engine(pipe.model, pdl=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="got cpu under TRITON_INTERPRET=1"):
        Engine(pipe.model, pdl=True)


def test_engine_passes_pdl_to_every_decode_kernel(monkeypatch):
    """With pdl=True (the device check patched to pass on CPU): the head's velocity and update, the layer kernels
    and every quantised linear, fused q/k/v and gate/up included, get it; pdl=False turns it off again."""
    path = REFERENCE / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    pipe = Pipeline.from_pretrained(path)
    apply_quantization(pipe.model, "int8")
    monkeypatch.setattr(pdl_mod, "supported", lambda device: True)
    monkeypatch.setattr(head_kernels_mod, "available", lambda device: True)
    monkeypatch.setattr(layer_kernels_mod, "available", lambda device: True)
    opts = GenerateOptions(size=(32, 32), steps=2, cfg=2.0)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox"])
    for pdl in (True, False):
        engine = Engine(pipe.model, pdl=pdl)
        st = engine.state(engine.key(tuple(ids.shape), settings, opts, n_tokens=4))
        assert st.head_kernels and st.layer_fn.func is layer_kernels_mod.decode_layer
        assert st.velocity.keywords["pdl"] is st.update.keywords["pdl"] is st.layer_fn.keywords["pdl"] is pdl
        quantized = [m for m in pipe.model.modules() if isinstance(m, QuantizedLinear)]
        assert pipe.model.layers[0].mlp.gate_up_proj in quantized and all(m.pdl is pdl for m in quantized)


def test_fused_quantized_linears_launch_as_their_parts():
    path = REFERENCE / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    pipe = Pipeline.from_pretrained(path)
    apply_quantization(pipe.model, "fp8")
    set_pdl(pipe.model, True)
    for layer in pipe.model.layers:  # copied apart (as a load does): fuse_quantized builds them again
        layer.self_attn.qkv_proj = layer.mlp.gate_up_proj = None
    assert fuse_quantized(pipe.model.layers)
    assert all(layer.self_attn.qkv_proj.pdl and layer.mlp.gate_up_proj.pdl for layer in pipe.model.layers)


needs_pdl = pytest.mark.skipif(
    not (torch.cuda.is_available() and pdl_mod.supported(torch.device("cuda"))), reason="needs an SM90+ GPU"
)


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("quantize", ["none", "fp8"])
@pytest.mark.parametrize("images", [1, 2])
def test_engine_pdl_gives_the_same_tokens_gpu(quantize, images):
    """bf16 or fp8 weights, batch 1 and 2 with guidance, CUDA graphs, fused head and layer kernels (the defaults):
    Engine(pdl=True) gives the tokens of Engine(pdl=False), the same draws."""
    path = REFERENCE / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    pipe = Pipeline.from_pretrained(path, device="cuda", quantize=quantize)
    opts = GenerateOptions(size=(64, 64), steps=8, cfg=3.0, sampler="sde")
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox in snow"][:images])
    outs = []
    for pdl in (False, True):
        engine = Engine(pipe.model, pdl=pdl)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=16, seed=0))
        st = engine._state
        assert engine.graphs and st.head_kernels and st.layer_fn.keywords["pdl"] is pdl
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("mode", ["none", "fp8"])
def test_kernels_with_pdl_match_without_gpu(mode):
    """The 14B flow head (fused kernels, 2 rows: the weight tile before the wait; 16 rows: tl.dot, waits first)
    and a quantised linear of the decoder (split K and not) with PDL on against off, each call chain captured in
    a CUDA graph as the engine runs it."""
    from nextstep.model.head import AdaLNMLP
    from nextstep.sampling import quant_kernels
    from nextstep.sampling.engine import step_modulations
    from nextstep.sampling.quantize import quantize_linear, quantize_linears

    torch.manual_seed(0)
    net = AdaLNMLP(64, 5120, 1536, 12).to("cuda", torch.bfloat16)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.03)
    if mode != "none":
        quantize_linears(net, mode, tuner=quant_kernels.Tuner(persist=False))

    def graphed(fn):
        fn()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        return out

    with torch.no_grad():
        for rows in (2, 16):
            cond = torch.randn(rows, 5120, device="cuda", dtype=torch.bfloat16)
            mods = step_modulations(net, net.time_embed(torch.rand(30, device="cuda")), cond)
            x = torch.randn(rows // 2, 64, device="cuda")
            got = [graphed(partial(head_kernels_mod.velocity, net, x, mods[3], 2, pdl=pdl)) for pdl in (False, True)]
            torch.testing.assert_close(got[1], got[0], rtol=1e-3, atol=1e-3)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        splits = []
        for n, k in ((7168, 5120), (1536, 1536)):  # on an H100/H200: K in one slice, K split in two (a second kernel)
            layer = quantize_linear(torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16), "fp8")
            x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
            config = quant_kernels.default_config(n, k, 2, sms)
            splits.append(config.split_k)
            linear = partial(quant_kernels.quant_linear, x, layer.weight, layer.scale, layer.bias, config=config)
            got = [graphed(partial(linear, pdl=pdl)) for pdl in (False, True)]
            torch.testing.assert_close(got[1], got[0], rtol=1e-3, atol=1e-3)
        assert splits[0] == 1 and splits[1] > 1, splits


def _compile_sm90(fn, ptrs: dict, scalars: dict, constexprs: dict, pdl: bool) -> str:
    """fn compiled for sm_90 (Triton's bundled ptxas; no GPU needed) with PDL=pdl -> its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {**constexprs, "PDL": pdl}
    sig = {**ptrs, **scalars, **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(fn, {name: sig[name] for name in fn.arg_names}, constexprs)
    options = {"num_warps": 4, "launch_pdl": pdl}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def test_kernels_compile_with_pdl_for_sm90():
    """Every decode kernel compiles for sm_90 with PDL: one griddepcontrol.wait, then launch_dependents, and no
    global store before the wait; the weight-reading kernels load before it (the GEMVs' first weight tile, the
    norm weight), the others load nothing before it (their inputs are the previous kernels' outputs). Without
    PDL no griddepcontrol at all."""
    pytest.importorskip("triton")
    from nextstep.sampling import quant_kernels as qk
    from nextstep.sampling import update_kernel as uk

    bf, f8, f32, i32, f = "*bf16", "*fp8e4nv", "*fp32", "i32", "fp32"
    hk, lk = head_kernels_mod, layer_kernels_mod
    mod = dict(x_ptr=bf, lnw_ptr=bf, lnb_ptr=bf, scale_ptr=bf, shift_ptr=bf, w_ptr=f8, ws_ptr=f32, b_ptr=bf, out_ptr=bf)
    gated = dict(a_ptr=bf, w_ptr=bf, ws_ptr=f32, b_ptr=bf, gate_ptr=bf, res_ptr=bf, out_ptr=bf)
    rope = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, cos_ptr=bf, sin_ptr=bf, slot_ptr="*i64", qo_ptr=bf, kc_ptr=bf, vc_ptr=bf)
    few = dict(K=256, HAS_SCALE=True, BLOCK_R=2, BLOCK_N=8, BLOCK_K=256, DOT=False)  # broadcast, whole K
    dot = dict(K=256, HAS_SCALE=False, BLOCK_R=16, BLOCK_N=16, BLOCK_K=64, DOT=True)
    modc = dict(HAS_AFFINE=True, SILU=True, K_POW2=256)
    split = dict(K=1100, K_SPLIT=576, EVEN_K=False, HAS_BIAS=True, SPLIT_K=2, DOT_F32=False, BLOCK_M=16, BLOCK_N=32)
    cases = [  # (kernel, pointers, scalars, constexprs, loads before the wait)
        (hk._modulated_linear, mod, dict(R=i32, N=i32, eps=f), {**few, **modc}, True),
        (hk._modulated_linear, mod, dict(R=i32, N=i32, eps=f), {**dot, **modc}, False),  # tl.dot: waits first
        (hk._gated_linear, gated, dict(R=i32, N=i32), few, True),
        (hk._input_rows, dict(x_ptr=f32, w_ptr=bf, ws_ptr=f32, b_ptr=bf, out_ptr=bf), dict(B=i32, R=i32, K=i32, N=i32),
         dict(HAS_SCALE=False, BLOCK_R=2, BLOCK_N=8, K_POW2=64, DOT=False), True),
        (uk._guided_update, dict(x_ptr=f32, eps_ptr=f32, v_ptr=bf, scales_ptr=f32, out_ptr=f32),
         dict(a=f, b=f, B=i32, D=i32), dict(ROWS=2, HAS_EPS=True, NORMALIZE=True, D_POW2=64), False),
        (lk._rms_norm, dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, sum_ptr=bf, out_ptr=bf), dict(N=i32, eps=f),
         dict(HAS_RES=True, BLOCK=1024), True),
        (lk._rope_cache, rope, dict(q_stride=i32, k_stride=i32, v_stride=i32, cs_stride=i32, L_MAX=i32),
         dict(H=4, HKV=2, HALF=32, BLOCK=32), False),
        (lk._silu_mul, dict(g_ptr=bf, u_ptr=bf, out_ptr=bf), dict(g_stride=i32, u_stride=i32, F=i32), dict(BLOCK=1024),
         False),
        (qk._quant_linear, dict(x_ptr=bf, w_ptr=f8, scale_ptr=f32, b_ptr=bf, out_ptr=f32), dict(M=i32, N=i32),
         {**split, "BLOCK_K": 64}, True),
        (qk._sum_splits, dict(part_ptr=f32, b_ptr=bf, out_ptr=bf), dict(MN=i32, N=i32),
         dict(HAS_BIAS=True, SPLIT_K=2, BLOCK=1024), False),
    ]  # fmt: skip
    for fn, ptrs, scalars, constexprs, early in cases:
        ptx = _compile_sm90(fn, ptrs, scalars, constexprs, pdl=True)
        lines = ptx.splitlines()
        waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
        launch = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
        assert len(waits) == 1 and len(launch) == 1 and waits[0] < launch[0], fn.__name__
        before = lines[: waits[0]]
        assert not any("st.global" in line for line in before), fn.__name__
        assert any("ld.global" in line for line in before) == early, fn.__name__
        assert "griddepcontrol" not in _compile_sm90(fn, ptrs, scalars, constexprs, pdl=False), fn.__name__
