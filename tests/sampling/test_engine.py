"""The engine equals the eager Pipeline.generate_tokens and the official per-token loop (CPU fp32; bf16 + CUDA graphs
on GPU)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.model.backbone import FusedLinear, build_attention_mask
from nextstep.model.nextstep import NextStep
from nextstep.model.vae import pil_to_pixels
from nextstep.sampling import engine as engine_mod
from nextstep.sampling import head_kernels as head_kernels_mod
from nextstep.sampling.engine import Engine, Recording, pad_rows
from nextstep.sampling.flow import FlowSettings, guidance_rows, guidance_table, sample_token
from nextstep.sampling.pipeline import GenerateOptions, Pipeline
from nextstep.sampling.quantize import QuantizedLinear, apply_quantization, quantize_linear
from tests.refs import ROOT

REFERENCE = ROOT
FAMILIES = {"nextstep11": "nextstep11-tiny", "nextstep1": "nextstep-tiny"}
_PIPES: dict[tuple[str, str], Pipeline] = {}


def load(family: str, device: str = "cpu") -> Pipeline:
    path = REFERENCE / FAMILIES[family]
    if not path.is_dir():
        pytest.skip(f"reference checkpoint {path} not found")
    if (family, device) not in _PIPES:
        _PIPES[family, device] = Pipeline.from_pretrained(path, device=device)
    return _PIPES[family, device]


def replay(seed: int, device: str = "cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen, device=device)


def fast(pipe: Pipeline, ids, mask, latents, settings, opts: GenerateOptions, **kw) -> torch.Tensor:
    """The pipeline's fast engine on the same rows, prefill, guidance and draws as Pipeline.generate_tokens."""
    n_tokens = (opts.size[0] // pipe.down_factor) * (opts.size[1] // pipe.down_factor)
    opts = dataclasses.replace(opts, engine="fast")
    return pipe.engine(opts).generate(ids, mask, latents, settings, opts, n_tokens=n_tokens, **kw)


def inputs(pipe: Pipeline, opts: GenerateOptions, captions: list[str], edit: bool = False):
    """The pipeline's own rows, padding and source latents for `captions` (left padded, ragged)."""
    if edit:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 255, (*opts.size, 3), dtype=np.uint8))
        sources = [[img] for _ in captions]
        captions = [pipe._image_string(opts.size) + c for c in captions]
    else:
        sources = [[] for _ in captions]
    texts, images = pipe._rows(captions, sources, opts)
    ids, mask = pipe.tokenize(texts, opts.size)
    latents = pipe.encode_images([pil_to_pixels(i) for r in images for i in r])
    settings = FlowSettings(
        family=pipe.family,
        num_steps=opts.steps,
        shift=opts.shift,
        rule=opts.sampler,
        noise_level=opts.noise_level,
    )
    return ids, mask, latents, settings


CASES = [
    # family, sampler, options, edit (3-way guidance with a source image), replayed draws
    ("nextstep11", "sde", dict(cfg=7.5, cfg_schedule="linear", cfg_normalize=True), False, False),
    ("nextstep11", "cps", dict(cfg=3.0, cfg_img=2.0, use_norm=True, shift=3.2), True, True),
    ("nextstep11", "ode", dict(cfg=1.0), False, True),
    ("nextstep1", "sde", dict(cfg=5.0, cfg_schedule="linear", n=2), False, True),
    ("nextstep1", "ode", dict(cfg=4.0, cfg_img=1.5, use_norm=True), True, False),
    ("nextstep1", "sde", dict(cfg=3.0, context_noise=0.3), False, False),
    ("nextstep11", "sde", dict(cfg=3.0, cfg_img=1.5, context_noise=0.5), True, True),
]


@pytest.mark.parametrize("family,sampler,extra,edit,replayed", CASES)
def test_engine_equals_eager_cpu(family, sampler, extra, edit, replayed):
    pipe = load(family)
    opts = GenerateOptions(size=(64, 64), steps=6, sampler=sampler, **extra)
    captions = ["a fox", "a much longer prompt about a red fox in deep snow at dawn"]
    ids, mask, latents, settings = inputs(pipe, opts, captions, edit)
    assert (mask == 0).any(), "prompts must differ in length to test left padding"
    draw = (lambda: replay(5)) if replayed else (lambda: None)
    eager = pipe.generate_tokens(ids, mask, latents, settings, opts, seed=5, draw=draw())
    got = fast(pipe, ids, mask, latents, settings, opts, seed=5, draw=draw())
    assert got.shape == eager.shape == (len(captions) * opts.n, 16, pipe.model.config.token_dim)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def reference_tokens(pipe: Pipeline, ids, mask, latents, settings, opts: GenerateOptions, draw) -> torch.Tensor:
    """The loop in the official per-token form: flow.sample_token over net(x, t, cond), then the model's forward
    on the fed-back token with a full-length mask (no step batching, no cache buckets, no captured state)."""
    model = pipe.model
    rows = guidance_rows(opts.cfg, opts.cfg_img)
    r, n_prefix = ids.shape
    n_tokens = (opts.size[0] // pipe.down_factor) * (opts.size[1] // pipe.down_factor)
    key_valid = torch.ones(r, n_prefix + n_tokens, dtype=torch.bool)
    key_valid[:, :n_prefix] = mask.bool()
    slots = torch.arange(n_prefix + n_tokens)
    scales = guidance_table(pipe.family, opts, n_tokens).tolist()
    out = []
    model.setup_caches(r, n_prefix + n_tokens)
    try:
        with torch.no_grad():
            pos = slots[:n_prefix]
            embeds = model.embed(ids, latents)
            hidden = model.forward_hidden(
                embeds, position_ids=pos.expand(r, -1), mask=build_attention_mask(key_valid, pos, slots), slots=pos
            )
            for k in range(n_tokens):
                cond = model.head_condition(hidden[:, -1])
                token = sample_token(
                    model.image_head.net,
                    cond,
                    settings,
                    cfg=scales[k][0],
                    cfg_img=scales[k][1],
                    normalize=opts.cfg_normalize,
                    rows=rows,
                    token_dim=model.config.token_dim,
                    draw=draw,
                )
                if opts.use_norm:
                    token = torch.nn.functional.layer_norm(token, token.shape[-1:], eps=1e-6)
                out.append(token)
                if k == n_tokens - 1:
                    break
                fed = token + opts.context_noise * draw(tuple(token.shape)) if opts.context_noise else token
                slot = slots[n_prefix + k : n_prefix + k + 1]
                x = model.image_in_projector(fed).repeat(rows, 1)[:, None]  # (R, 1, d)
                mask_k = build_attention_mask(key_valid, slot, slots)
                hidden = model.forward_hidden(x, position_ids=slot.expand(r, 1), mask=mask_k, slots=slot)
    finally:
        model.clear_caches()
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("family,sampler,extra,edit,replayed", CASES)
def test_engine_equals_reference_loop_cpu(family, sampler, extra, edit, replayed):
    """Eager (the engine without graphs) equals the official per-token loop built from the model's forward
    and flow.sample_token, with the same draws."""
    pipe = load(family)
    opts = GenerateOptions(size=(64, 64), steps=6, sampler=sampler, engine="eager", **extra)
    ids, mask, latents, settings = inputs(
        pipe, opts, ["a fox", "a much longer prompt about a red fox in deep snow"], edit
    )
    draw = replay(5)
    got = pipe.generate_tokens(ids, mask, latents, settings, opts, seed=5, draw=draw if replayed else None)
    want = reference_tokens(pipe, ids, mask, latents, settings, opts, replay(5))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_engine_reuses_state_across_prompt_lengths():
    """Prompts of different lengths fit the same cache bucket: one state (cache, graphs) serves both."""
    pipe = load("nextstep11")
    opts = GenerateOptions(size=(64, 64), steps=4, engine="fast")
    states = []
    for captions in (["short"], ["a somewhat longer prompt than the first one"]):
        ids, mask, latents, settings = inputs(pipe, opts, captions)
        eager = reference_tokens(pipe, ids, mask, latents, settings, opts, replay(1))
        got = fast(pipe, ids, mask, latents, settings, opts, seed=1)
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
        states.append(pipe.engine(opts)._state)
    engine = pipe.engine(opts)
    assert states[0] is states[1] is engine._state and engine._state.key.max_len % engine.kv_block == 0


def test_engine_keeps_max_states_and_drops_the_least_recently_used():
    pipe = load("nextstep11")
    engine = Engine(pipe.model, max_states=2)
    opts = GenerateOptions(size=(32, 32), steps=2)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox"])

    def state(steps: int):
        s = dataclasses.replace(settings, num_steps=steps)
        engine.generate(ids, mask, latents, s, opts, n_tokens=4, seed=0)
        return engine._state

    two, three = state(2), state(3)
    assert state(2) is two and state(3) is three and two is not three  # both kept: nothing rebuilt
    state(4)  # a third key drops the least recently used, two steps
    assert state(3) is three and state(2) is not two
    with pytest.raises(ValueError, match="max_states must be >= 1, got 0"):
        Engine(pipe.model, max_states=0)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_linear_close(mode):
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    q = quantize_linear(lin, mode)
    ref = lin(x)
    err = (q(x) - ref).norm() / ref.norm()
    assert err < (1e-2 if mode == "int8" else 5e-2)


def test_quantized_engine_runs():
    path = REFERENCE / FAMILIES["nextstep11"]
    if not path.is_dir():
        pytest.skip("reference checkpoint not found")
    pipe = Pipeline.from_pretrained(path, device="cpu")
    Engine(pipe.model)  # fuses q/k/v and gate/up copies of the float weights
    assert isinstance(pipe.model.layers[0].mlp.gate_up_proj, FusedLinear)
    apply_quantization(pipe.model, "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in pipe.model.layers.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in pipe.model.image_head.net.modules())
    assert not Engine(pipe.model).head_kernels  # no Triton on CPU
    # The float copies are gone; the quantised fusion replaced them (a float one would bypass the quantised weights).
    fused = [(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for layer in pipe.model.layers]
    assert all(isinstance(m, QuantizedLinear) and m.weight.dtype == torch.int8 for pair in fused for m in pair)
    opts = GenerateOptions(size=(32, 32), steps=3)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox"])
    out = Engine(pipe.model).generate(ids, mask, latents, settings, opts, n_tokens=4, seed=0)
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="quantize"):
        apply_quantization(NextStep(pipe.model.config), "int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["nextstep11", "nextstep1"])
def test_engine_graphs_match_eager_gpu(family):
    """bf16 weights, CUDA graphs: equal to the eager pipeline within bf16 tolerance."""
    pipe = load(family, "cuda")
    opts = GenerateOptions(size=(64, 64), steps=8, cfg=3.0, sampler="sde")
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a longer prompt about a red fox in snow"])
    eager_opts = dataclasses.replace(opts, engine="eager")
    eager = pipe.generate_tokens(ids, mask, latents, settings, eager_opts, seed=0, draw=replay(0, "cuda"))
    assert not pipe.engine(eager_opts).graphs
    engine = pipe.engine(opts)
    got = fast(pipe, ids, mask, latents, settings, opts, seed=0, draw=replay(0, "cuda"))
    assert engine.graphs and engine._state.head.graph is not None
    err = ((got - eager).norm() / eager.norm()).item()
    first = ((got[:, 0] - eager[:, 0]).norm() / eager[:, 0].norm()).item()
    assert first < 2e-2 and err < 5e-2, (first, err)
    again = fast(pipe, ids, mask, latents, settings, opts, seed=0, draw=replay(0, "cuda"))
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # replays are deterministic


def test_pipeline_engine_switches_compile_setting():
    """`--engine compiled` gets a compiling engine; asking again without compile replaces it. The engine is the
    pipeline's: another pipeline on the same model has its own, and compiling leaves dynamo's settings alone."""
    pipe = load("nextstep11")
    limit = torch._dynamo.config.recompile_limit
    fast_opts = GenerateOptions(engine="fast")
    plain = pipe.engine(fast_opts)
    assert pipe.engine(fast_opts) is plain and not plain.compile
    compiled = pipe.engine(GenerateOptions(engine="compiled"))
    assert compiled is not plain and compiled.compile
    assert pipe.engine(GenerateOptions(engine="compiled")) is compiled
    assert not pipe.engine(fast_opts).compile
    eager = pipe.engine(GenerateOptions(engine="eager"))  # the same code without graphs or fused kernels
    assert not (eager.graphs or eager.head_kernels or eager.compile)
    other = Pipeline(pipe.model, pipe.vae, pipe.tokenizer)
    assert other.engine(fast_opts) is not pipe.engine(fast_opts)
    assert torch._dynamo.config.recompile_limit == limit
    with pytest.raises(ValueError, match="engine must be one of auto, fast, compiled, eager, got 'turbo'"):
        pipe.generate("a fox", size=(32, 32), steps=2, engine="turbo")


@pytest.mark.parametrize("edit, replayed", [(False, False), (True, True)])
def test_padded_batch_equals_unpadded(edit, replayed):
    """A batch of 3 run at bucket 4 (padded with copies of its first image) gives the unpadded tokens: the same
    draws for its own rows, the same on_token views, the padding dropped; a Recording keeps 3 images too."""
    pipe = load("nextstep11")
    options = dict(cfg=3.0, cfg_img=2.0) if edit else dict(cfg=5.0)
    opts = GenerateOptions(size=(32, 32), steps=3, **options)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "two red circles", "a longer prompt of a cat"], edit)
    seen = []

    def run(buckets):
        engine, draw = Engine(pipe.model, batch_buckets=buckets), replay(7) if replayed else None
        out = engine.generate(
            ids,
            mask,
            latents,
            settings,
            opts,
            n_tokens=4,
            seed=7,
            draw=draw,
            on_token=lambda k, tokens: seen.append(tuple(tokens.shape)),
        )
        return out, engine._state.key.batch

    want, unpadded = run(())
    got, padded = run((1, 2, 4, 8))
    assert (unpadded, padded) == (3, 4) and got.shape == want.shape == (3, 4, pipe.model.config.token_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen[:4] == seen[4:] == [(3, k + 1, pipe.model.config.token_dim) for k in range(4)]


def test_padded_recording_keeps_the_batch():
    pipe = load("nextstep11")
    opts = GenerateOptions(size=(32, 32), steps=3, cfg=1.0, sampler="sde")
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox", "a cat", "a dog"])
    recs = []
    for buckets in ((), (4,)):
        rec = Recording(steps=(0, 2))
        Engine(pipe.model, batch_buckets=buckets).generate(
            ids, mask, latents, settings, opts, n_tokens=4, seed=3, record=rec
        )
        recs.append(rec)
    assert recs[1].x.shape == recs[0].x.shape == (3, 4, 2, pipe.model.config.token_dim)
    for a, b in zip((recs[0].x, recs[0].v, recs[0].x_next), (recs[1].x, recs[1].v, recs[1].x_next), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_pad_rows_repeats_each_branch_first_row_with_its_image_tokens():
    p = 9  # placeholder id
    ids = torch.tensor([[1, p, p], [2, 3, 4], [5, p, p], [6, 7, 8]])  # 2 branches x 2 images, guidance-major
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    tokens = torch.arange(4.0)[:, None].expand(4, 2)  # row 0's two placeholders, then row 2's
    got_ids, got_mask, got_tokens = pad_rows(ids, mask, tokens, rows=2, batch=3, image_id=p)
    assert got_ids.tolist() == [[1, p, p], [2, 3, 4], [1, p, p], [5, p, p], [6, 7, 8], [5, p, p]]
    assert got_mask[1, 0] == 0 and got_mask.sum() == 17
    assert got_tokens[:, 0].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    with pytest.raises(ValueError, match="batch_buckets must be positive"):
        Engine(load("nextstep11").model, batch_buckets=(0, 4))


def test_engine_buckets_and_prepare_build_the_state_a_call_reuses():
    pipe = load("nextstep11")
    pipe.configure_engine(max_states=3, batch_buckets=(1, 2, 4))
    try:
        opts = GenerateOptions(size=(32, 32), steps=2, cfg=2.0)
        engine = pipe.engine(opts)
        assert [engine.bucket(b) for b in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
        pipe.warm(4, size=(32, 32), steps=2, cfg=2.0)
        warmed = engine._state
        assert warmed.key.batch == 4 and warmed.key.rows == 2
        images = pipe.generate(["a fox", "a cat", "a dog"], size=(32, 32), steps=2, cfg=2.0, seed=0)
        assert len(images) == 3 and engine._state is warmed  # the call of 3 ran in the warmed state of 4
    finally:
        pipe.configure_engine()


def test_engine_state_that_runs_out_of_memory_drops_the_kept_ones(monkeypatch):
    pipe = load("nextstep11")
    engine = Engine(pipe.model, max_states=4)
    opts = GenerateOptions(size=(32, 32), steps=2)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox"])
    for steps in (2, 3):
        engine.generate(ids, mask, latents, dataclasses.replace(settings, num_steps=steps), opts, n_tokens=2, seed=0)
    build, calls = engine_mod._State, []

    def short_of_memory(eng, key):
        calls.append(len(eng._states))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return build(eng, key)

    monkeypatch.setattr(engine_mod, "_State", short_of_memory)
    engine.generate(ids, mask, latents, dataclasses.replace(settings, num_steps=4), opts, n_tokens=2, seed=0)
    assert calls == [2, 0] and len(engine._states) == 1  # the two kept states dropped, the new one built alone
    monkeypatch.setattr(engine_mod, "_State", lambda eng, key: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to drop: the error is the caller's
        Engine(pipe.model).generate(ids, mask, latents, settings, opts, n_tokens=2, seed=0)


def test_engine_runs_the_torch_head_when_no_fused_launch_compiles(monkeypatch, caplog):
    """A GPU on which no fused head launch compiles (tune gives None) gets the torch head, not a crash."""
    pipe = load("nextstep11")
    opts = GenerateOptions(size=(32, 32), steps=2, cfg=2.0)
    ids, mask, latents, settings = inputs(pipe, opts, ["a fox"])
    want = Engine(pipe.model, head_kernels=False).generate(ids, mask, latents, settings, opts, n_tokens=3, seed=0)
    monkeypatch.setattr(head_kernels_mod, "tune", lambda net, rows, device, persist=True: None)
    engine = Engine(pipe.model, head_kernels=True)
    with caplog.at_level(logging.WARNING):
        got = engine.generate(ids, mask, latents, settings, opts, n_tokens=3, seed=0)
    assert torch.equal(got, want) and not engine._state.head_kernels
    assert "no fused head kernel launch compiles for 2 rows" in caplog.text


def test_head_tuner_gives_none_when_no_candidate_runs(monkeypatch):
    def rejected(run, reps=12):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(head_kernels_mod, "_graph_time", rejected)
    assert head_kernels_mod._fastest(load("nextstep11").model.image_head.net, 16, torch.device("cpu")) is None


def test_default_kernels_are_the_measured_ones(monkeypatch):
    """Where Triton runs: the fused head by default up to BROADCAST_ROWS rows (its tl.dot path lost to the torch
    ops at 64 rows on the H200), up to MAX_ROWS when asked for; the layer kernels on, except with compile."""
    from nextstep.sampling import layer_kernels as layer_kernels_mod

    pipe = load("nextstep11")
    monkeypatch.setattr(head_kernels_mod, "available", lambda device: True)
    monkeypatch.setattr(layer_kernels_mod, "available", lambda device: True)
    auto, asked = Engine(pipe.model), Engine(pipe.model, head_kernels=True)
    small, big = head_kernels_mod.BROADCAST_ROWS, head_kernels_mod.MAX_ROWS
    assert auto.use_head_kernels(small) and not auto.use_head_kernels(small + 1)
    assert asked.use_head_kernels(big) and not asked.use_head_kernels(big + 1)
    assert not Engine(pipe.model, head_kernels=False).use_head_kernels(1)
    assert auto.layer_kernels and not Engine(pipe.model, compile=True).layer_kernels
    assert not Engine(pipe.model, layer_kernels=False).layer_kernels
    monkeypatch.setattr(layer_kernels_mod, "available", lambda device: False)
    assert not Engine(pipe.model).layer_kernels
