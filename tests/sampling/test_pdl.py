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
    monkeypatch.setattr(pdl_mod, "triton", object())  # as if Triton with grid dependency control were installed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not pdl_mod.supported(cuda)  # A100: no griddepcontrol
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl_mod.supported(cuda)
    monkeypatch.setattr(pdl_mod, "triton", None)
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
