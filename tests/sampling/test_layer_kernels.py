"""Decode-step layer kernels equal their eager definitions (nextstep.model.backbone): each kernel at small odd
shapes in fp32 and bf16, and decode_layer against DecoderLayer.forward over several cached decode steps (outputs
and cache contents), GQA and not, float and fp8/int8 projections, in Triton's CPU interpreter; the engine with
layer kernels against the engine without, on CPU (interpreter) and on CUDA with graphs. Skipped where Triton is
not installed (the CPU install has no Triton: there the engine never uses these kernels)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextstep.model.backbone import DecoderLayer, KVCache, fuse_projections, rope_cos_sin
from nextstep.model.config import NextStepConfig
from nextstep.model.nextstep import NextStep
from nextstep.sampling import layer_kernels as lk
from nextstep.sampling.engine import Engine
from nextstep.sampling.pipeline import GenerateOptions, Pipeline
from nextstep.sampling.quant_kernels import Tuner
from nextstep.sampling.quantize import fuse_quantized, quantize_linears
from tests.refs import ROOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


def close(got: torch.Tensor, want: torch.Tensor, what: str, *, scale: float | None = None) -> None:
    """got equals want in shape and dtype, within fp32 rounding (fp32) or two bf16 ulps of the largest entry
    (bf16: the interpreter truncates where CUDA rounds to nearest); NaN nowhere."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    assert not got.isnan().any(), what
    scale = want.abs().max().item() if scale is None else scale
    tol = 1e-5 if want.dtype == torch.float32 else 2**-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * scale + 1e-6, (what, err, tol * scale)


KERNELS = r"""
import torch
import torch.nn.functional as F
from nextstep.model.backbone import KVCache, RMSNorm, apply_rope, rope_cos_sin
from nextstep.sampling import layer_kernels as lk
from tests.sampling.test_layer_kernels import close

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    b, d = 3, 37
    norm = RMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(d))
        x, a = 2 * torch.randn(b, 1, d, dtype=dtype), torch.randn(b, 1, d, dtype=dtype)
        close(lk.rms_norm(x, norm), norm(x), "rms_norm")
        total, normed = lk.add_rms_norm(x, a, norm)
        close(total, x + a, "residual add")
        close(normed, norm(x + a), "add_rms_norm")

        for h, hkv, hd in ((6, 2, 10), (3, 3, 12)):  # GQA with D / 2 = 5 (not a power of two); no GQA
            lmax, slot = 7, 4
            qkv = torch.randn(b, 1, (h + 2 * hkv) * hd, dtype=dtype)
            q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)  # strided views, as from qkv_proj
            cos, sin = rope_cos_sin(torch.tensor([[5], [9], [130]]), hd, 1e4, dtype)  # (B, 1, 1, D)
            eager, fused = (KVCache(b, lmax, hkv, hd, dtype=dtype, device="cpu") for _ in range(2))
            for c in (eager, fused):  # the same earlier contents, which the write must leave alone
                torch.manual_seed(1)
                c.k.normal_(), c.v.normal_()
            slots = torch.tensor([slot])
            got = lk.rope_cache(q, k, v, cos, sin, fused, slots)
            qe = apply_rope(q.view(b, 1, h, hd).transpose(1, 2), cos, sin)  # (B, H, 1, D)
            ke = apply_rope(k.view(b, 1, hkv, hd).transpose(1, 2), cos, sin)
            eager.update(slots, ke, v.view(b, 1, hkv, hd).transpose(1, 2))
            close(got, qe[:, :, 0], f"rope q {h} {hkv}")
            close(fused.k, eager.k, f"rope k cache {h} {hkv}")
            assert torch.equal(fused.v, eager.v), "v cache"
            others = [i for i in range(lmax) if i != slot]
            assert torch.equal(fused.k[:, :, others], eager.k[:, :, others]), "other k slots"

        f = 37
        gate_up = 3 * torch.randn(b, 1, 2 * f, dtype=dtype)
        gate, up = gate_up.chunk(2, dim=-1)  # views of one tensor
        close(lk.silu_mul(gate, up), F.silu(gate) * up, "silu_mul views")
        gate, up = gate.contiguous(), up.contiguous() * 0.5  # two tensors
        close(lk.silu_mul(gate, up), F.silu(gate) * up, "silu_mul")
print("ok")
"""


LAYER = r"""
import copy, torch
from nextstep.model.backbone import DecoderLayer, build_attention_mask, fuse_projections, rope_cos_sin
from nextstep.model.config import NextStepConfig
from nextstep.model.nextstep import NextStep
from nextstep.sampling import layer_kernels as lk
from nextstep.sampling.quantize import apply_quantization, fuse_quantized
from tests.sampling.test_layer_kernels import close

CONFIGS = {  # GQA (head_dim 10: D / 2 not a power of two), and one KV head per query head
    "gqa": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=10, intermediate_size=37),
    "mha": dict(hidden_size=24, num_attention_heads=2, num_key_value_heads=2, head_dim=12, intermediate_size=20),
}
CASES = [  # config, projections, dtype
    ("gqa", "fused", torch.float32), ("mha", "fused", torch.float32), ("gqa", "separate", torch.float32),
    ("gqa", "fp8", torch.float32), ("mha", "int8", torch.float32),
    ("gqa", "fused", torch.bfloat16), ("mha", "fp8", torch.bfloat16),
]
forward = DecoderLayer.forward


def boom(*args, **kwargs):
    raise AssertionError("decode_layer fell back to DecoderLayer.forward")


def model_for(name, projections, dtype):
    torch.manual_seed(0)
    model = NextStep(NextStepConfig(**CONFIGS[name], num_hidden_layers=2, rms_norm_eps=1e-5)).to(dtype).eval()
    with torch.no_grad():
        for pname, p in model.layers.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "layernorm" in pname else 0.3 * torch.randn_like(p))
    if projections in ("fp8", "int8"):
        apply_quantization(model, projections)
        assert fuse_quantized(model.layers)
    elif projections == "fused":
        assert fuse_projections(model.layers)
    return model


def run(model, layer_fn):
    # Prefill 5 tokens (eager), then decode slots 5-10 with layer_fn -> the hidden states (steps, R, 1, d) fp32 and
    # the caches. The same inputs on every call; the mask covers 8 slots, then 16 (the engine's buckets).
    torch.manual_seed(1)
    dtype, d, r, n_prefix, max_len = model.layers[0].input_layernorm.weight.dtype, model.config.hidden_size, 3, 5, 16
    caches = model.setup_caches(r, max_len)
    slots = torch.arange(max_len)
    key_valid = torch.ones(r, max_len, dtype=torch.bool)
    key_valid[1, :2] = False  # a left-padded row
    x = torch.randn(r, n_prefix, d).to(dtype)
    pos = slots[:n_prefix]
    model.forward_hidden(x, position_ids=pos.expand(r, -1), mask=build_attention_mask(key_valid, pos, slots), slots=pos)
    out = []
    for slot in range(n_prefix, 11):
        kv = 8 if slot < 8 else max_len
        slot_t = torch.tensor([slot])
        mask = (key_valid[:, :kv] & (slots[:kv] <= slot_t))[:, None, None]  # (R, 1, 1, kv)
        x = torch.randn(r, 1, d).to(dtype)
        if layer_fn is not None:
            DecoderLayer.forward = boom
        try:
            kw = dict(position_ids=slot_t.expand(r, 1), mask=mask, slots=slot_t)
            hidden = model.forward_hidden(x, **kw, layer_fn=layer_fn)
        finally:
            DecoderLayer.forward = forward
        out.append(hidden.float())
    model.clear_caches()
    return torch.stack(out), torch.stack([torch.stack([c.k, c.v]) for c in caches]).float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


with torch.no_grad():
    for name, projections, dtype in CASES:
        model = model_for(name, projections, dtype)
        case = (name, projections, dtype)
        want, want_caches = run(model, None)
        got, got_caches = run(model, lk.decode_layer)
        if dtype == torch.float32:
            for i in range(len(got)):
                close(got[i], want[i], f"hidden {case} step {i}")
            close(got_caches, want_caches, f"caches {case}")
        else:
            # The interpreter truncates to bf16 where eager rounds to nearest: both against the fp32 model.
            truth, truth_caches = run(copy.deepcopy(model).float(), None)
            assert rel(got, truth) < 2 * rel(want, truth) + 1e-3, (case, rel(got, truth), rel(want, truth))
            assert rel(got_caches, truth_caches) < 2 * rel(want_caches, truth_caches) + 1e-3, case
            assert rel(got, want) < 5e-2, (case, rel(got, want))

    # What it does not serve runs the layer's forward: several query tokens, no cache, no mask.
    model = model_for("gqa", "fused", torch.float32)
    layer, d = model.layers[0], model.config.hidden_size
    x = torch.randn(2, 3, d)
    cos, sin = rope_cos_sin(torch.arange(3).expand(2, 3), 10, 1e6, torch.float32)
    torch.testing.assert_close(lk.decode_layer(layer, x, cos, sin, None), layer(x, cos, sin, None), rtol=0, atol=0)
    assert not lk.serves(layer, x[:, :1], cos[:, :, :1], torch.ones(2, 1, 1, 3, dtype=torch.bool), torch.tensor([0]))
print("ok")
"""


ENGINE = r"""
import sys, torch
from nextstep.sampling import layer_kernels as lk
from nextstep.sampling.engine import Engine
from nextstep.sampling.pipeline import GenerateOptions, Pipeline
from nextstep.sampling.quantize import apply_quantization

sys.path.insert(0, sys.argv[2])
from test_engine import inputs  # noqa: E402

for quantize in (None, "int8"):
    pipe = Pipeline.from_pretrained(sys.argv[1])
    if quantize:
        apply_quantization(pipe.model, quantize)
    opts = GenerateOptions(size=(32, 32), steps=3, sampler="sde", cfg=3.0)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox"])
    outs, conds = [], []
    for on in (False, True):
        engine = Engine(pipe.model, layer_kernels=on)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=4, seed=3))
        assert (getattr(engine._state.layer_fn, "func", None) is lk.decode_layer) == on
        conds.append(engine._state.cond.clone())  # the head condition after the last decode step
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conds[1], conds[0], rtol=1e-5, atol=1e-5)
print("ok")
"""


def _interpret(script: str, *args: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


@needs_triton
def test_kernels_equal_eager_interpreted():
    _interpret(KERNELS)


@needs_triton
def test_decode_layer_equals_layer_forward_interpreted():
    _interpret(LAYER)


@needs_triton
def test_engine_with_layer_kernels_equals_engine_without_interpreted():
    path = ROOT / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    _interpret(ENGINE, str(path), str(Path(__file__).resolve().parent))


def test_engine_refuses_layer_kernels_without_triton_device():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernels on CPU")
    model = NextStep(NextStepConfig())
    assert not Engine(model).layer_kernels  # off by default
    with pytest.raises(ValueError, match="layer_kernels=True needs Triton"):
        Engine(model, layer_kernels=True)


def _decode_steps(layer, cache: KVCache, layer_fn, slots: list[int]) -> list[torch.Tensor]:
    """layer_fn(layer, x, ...) with `cache` at each of `slots` on random tokens (the same on every call), the
    mask over the whole cache up to the slot -> outputs (B, 1, d) float32."""
    layer.self_attn.cache = cache
    b, _, kv, hd = cache.k.shape
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for slot in slots:
        slot_t = torch.tensor([slot], device="cuda")
        x = torch.randn(b, 1, layer.input_layernorm.weight.shape[0], device="cuda", generator=gen).bfloat16()
        cos, sin = rope_cos_sin(slot_t.expand(b, 1), hd, 1e6, torch.bfloat16)
        mask = (torch.arange(kv, device="cuda") <= slot_t).expand(b, kv)[:, None, None]
        out.append(layer_fn(layer, x, cos, sin, mask, slot_t).float())
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["none", "fp8"])
def test_decode_layer_matches_forward_14b_shape_gpu(mode):
    """One decoder layer of the 14B shape (5120 wide, 40 / 8 heads, MLP 13824) in bf16, fused projections
    (float or fp8): decode_layer against DecoderLayer.forward over decode steps, outputs and the cache within
    bf16 rounding; then decode_layer captured in a CUDA graph and replayed at a new slot (read on the device)
    equals it called directly."""
    cfg = NextStepConfig(
        hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128, intermediate_size=13824
    )
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layernorm" in name else 0.02 * torch.randn_like(p))
        if mode == "none":
            assert fuse_projections([layer])
        else:
            quantize_linears(layer, mode, tuner=Tuner())
            assert fuse_quantized([layer])
        caches = [KVCache(2, 512, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        slots = [3, 100, 255, 256, 300]
        want = _decode_steps(layer, caches[0], DecoderLayer.forward, slots)
        got = _decode_steps(layer, caches[1], lk.decode_layer, slots)
        errs = [_rel(g, w) for g, w in zip(got, want, strict=True)]
        assert max(errs) < 1e-2, errs
        assert _rel(caches[1].k, caches[0].k) < 1e-2 and _rel(caches[1].v, caches[0].v) < 1e-2

        # Captured once, replayed at another slot with another token: equal to a direct call there.
        x = torch.randn(2, 1, 5120, device="cuda", dtype=torch.bfloat16)
        slot = torch.tensor([7], device="cuda")
        mask = torch.zeros(2, 1, 1, 256, dtype=torch.bool, device="cuda")

        def step():
            cos, sin = rope_cos_sin(slot.expand(2, 1), 128, 1e6, torch.bfloat16)
            return lk.decode_layer(layer, x, cos, sin, mask, slot)

        step()  # compiles the kernels, tunes the fp8 linears
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        x.normal_()
        slot.fill_(200)
        mask.copy_((torch.arange(256, device="cuda") <= 200).expand(2, 1, 1, 256))
        graph.replay()
        cache = layer.self_attn.cache
        replayed, written = out.clone(), cache.k[:, :, 200].clone()
        cache.k[:, :, 200].zero_()
        direct = step()  # the same kernels; cuBLAS may pick another GEMV outside a capture, hence no bit equality
        assert _rel(replayed, direct) < 1e-3 and _rel(written, cache.k[:, :, 200]) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_engine_with_layer_kernels_matches_gpu(quantize):
    """bf16 on CUDA with graphs: the engine with layer kernels against the engine without, same draws."""
    from tests.sampling.test_engine import inputs

    path = ROOT / "nextstep11-tiny"
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    pipe = Pipeline.from_pretrained(path, device="cuda", quantize=quantize)
    opts = GenerateOptions(size=(64, 64), steps=8, cfg=3.0, sampler="sde")
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox in snow"])
    outs, conds = [], []
    for on in (False, True):
        engine = Engine(pipe.model, layer_kernels=on)
        outs.append(engine.generate(ids, mask, latents, settings, opts, n_tokens=16, seed=0))
        assert engine.graphs and (getattr(engine._state.layer_fn, "func", None) is lk.decode_layer) == on
        conds.append(engine._state.cond.float())
    first = ((outs[1][:, 0] - outs[0][:, 0]).norm() / outs[0][:, 0].norm()).item()
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    cond = ((conds[1] - conds[0]).norm() / conds[0].norm()).item()
    assert first < 2e-2 and err < 5e-2 and cond < 5e-2, (first, err, cond)
