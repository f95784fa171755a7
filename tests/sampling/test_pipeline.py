"""Full replays of the official generations and edits, from the seed alone and from recorded draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.sampling.pipeline import Pipeline, Trace
from tests.refs import dirs_with, first_with, max_diff, meta, tensors


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).int()  # (H, W, 3)


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, ref) -> Pipeline:
    if ref not in pipes:
        pipes[ref] = Pipeline.from_pretrained(ref, device="cpu")
    return pipes[ref]


@pytest.mark.parametrize("ref", dirs_with("nextstep1"), ids=lambda p: p.name)
@pytest.mark.parametrize("replay", [False, True], ids=["seeded-rng", "recorded-draws"])
def test_nextstep1_generate_image(pipes, ref, replay):
    pipe = _pipe(pipes, ref)
    for name, info in meta(ref)["e_sampler"].items():
        e = tensors(ref, f"e_sampler_{name}.safetensors")
        trace = Trace()
        options = dict(
            size=tuple(info["hw"]),
            steps=info["num_sampling_steps"],
            cfg=info["cfg"],
            shift=info["timesteps_shift"],
            use_norm=info["use_norm"],
            seed=info["seed"],
            positive_prompt=info["positive_prompt"] or "",
            negative_prompt=info["negative_prompt"] or "",
        )
        if replay:
            draws = list(e["noise_draws"].flatten(0, 1))
            pipe_draw = lambda shape, d=draws: d.pop(0)  # noqa: E731
            images = _generate_with_draw(pipe, info["captions"], pipe_draw, trace, options)
            assert not draws
        else:
            images = pipe.generate(info["captions"], trace=trace, **options)
        assert torch.equal(trace.input_ids, e["prompt_input_ids"]), name
        assert torch.equal(trace.attention_mask, e["prompt_attention_mask"]), name
        assert max_diff(torch.stack(trace.conditions, 1), e["head_cond_per_token"]) < 1e-5
        assert max_diff(torch.stack(trace.raw_tokens, 1), e["head_sample_per_token"]) < 1e-5
        # The reference README: replaying implementations match e to about 1e-5.
        assert max_diff(trace.final_latents, e["final_latents_unnormalized"]) < 1e-5
        assert max_diff(trace.decoded, e["decoded_image_float"]) < 1e-5
        assert max_diff(_pixels(images[0]).permute(2, 0, 1), e["image_uint8"]) <= 1


def _generate_with_draw(pipe, caption, draw, trace, options):
    """generate() with every random draw replaced by the recorded ones."""
    original = pipe.generate_tokens

    def replay(*args, **kwargs):
        return original(*args, **{**kwargs, "draw": draw})

    pipe.generate_tokens = replay
    try:
        return pipe.generate(caption, trace=trace, **options)
    finally:
        del pipe.generate_tokens


@pytest.mark.parametrize("ref", dirs_with("nextstep11"), ids=lambda p: p.name)
@pytest.mark.parametrize("run", ["t2i", "edit"])
@pytest.mark.parametrize("replay", [False, True], ids=["seeded-rng", "recorded-draws"])
def test_nextstep11_pipeline(pipes, ref, run, replay):
    pipe = _pipe(pipes, ref)
    info = meta(ref)["e"][run]
    call = info["call"]
    e = {k.removeprefix(f"e.{run}."): v for k, v in tensors(ref, "pipeline.safetensors").items() if f".{run}." in k}
    options = dict(
        size=tuple(call["hw"]),
        steps=call["num_sampling_steps"],
        cfg=call["cfg"],
        cfg_img=call["cfg_img"],
        cfg_schedule=call["cfg_schedule"],
        shift=call["timesteps_shift"],
        sampler=call["sde_type"],
        use_norm=call["use_norm"],
        seed=call["seed"],
        negative_prompt=call["negative_prompt"] or "",
        positive_prompt=call["positive_prompt"] or "",
    )
    trace = Trace()
    if run == "t2i":
        generate = lambda: pipe.generate(call["captions"], trace=trace, **options)  # noqa: E731
    else:
        source = Image.open(ref / "reference" / call["images"])
        instruction = call["captions"].replace("<image>", "")
        generate = lambda: pipe.edit(source, instruction, trace=trace, **options)  # noqa: E731
    if replay:
        shapes = info["randn_draw_shapes_in_order"]
        flat = e["randn"]
        draws, at = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            draws.append(flat[at : at + size].reshape(shape))
            at += size
        if run == "edit":
            draws.pop(0)  # the posterior sample of the input image, drawn before the seed (std 0 there)
        original = pipe.generate_tokens
        pipe.generate_tokens = lambda *a, **k: original(*a, **{**k, "draw": lambda shape: draws.pop(0)})
        try:
            images = generate()
        finally:
            del pipe.generate_tokens
        assert not draws
    else:
        images = generate()
    valid = e["attention_mask_prefill"].bool()
    assert torch.equal(trace.input_ids, e["input_ids"])
    assert torch.equal(trace.attention_mask, e["attention_mask_prefill"])
    assert pipe.tokenizer.decode(trace.input_ids[0].tolist()) == info["decoded_input_ids"][0]
    assert max_diff(trace.inputs_embeds[valid], e["inputs_embeds_prefill"][valid]) < 1e-5
    assert max_diff(trace.prefill_hidden[valid], e["prefill_last_hidden_state"][valid]) < 1e-4
    assert max_diff(torch.stack(trace.conditions), e["head_conditions"]) < 1e-4
    assert max_diff(trace.final_latents, e["final_latents"]) < 1e-4
    assert max_diff(trace.decoded, e["decoded_image"]) < 1e-4
    assert max_diff(_pixels(images[0]), e["image_uint8"]) <= 1
    assert max_diff(_pixels(images[0]), _pixels(Image.open(ref / "reference" / f"{run}.png"))) <= 1


def test_same_seed_same_image_and_batches(pipes):
    ref = first_with("nextstep11")
    pipe = _pipe(pipes, ref)
    opts = dict(size=(32, 32), steps=3, cfg=3.0, seed=5)
    a = pipe.generate("a dog", **opts)[0]
    b = pipe.generate("a dog", **opts)[0]
    c = pipe.generate("a dog", **{**opts, "seed": 6})[0]
    assert np.array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(c))
    batch = pipe.generate(["a dog", "a much longer prompt about a red car"], n=2, negative_prompt="blurry", **opts)
    assert len(batch) == 4 and all(im.size == (32, 32) for im in batch)
    wide = pipe.generate("a dog", **{**opts, "size": (32, 64)})[0]
    assert wide.size == (64, 32)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(size=(30, 32)), "multiples of 16"),
        (dict(steps=0), "steps"),
        (dict(n=0), "n \\(images"),
        (dict(sampler="euler"), "sampler"),
        (dict(context_noise=-0.1), "context_noise must be in \\[0, 10\\], got -0.1"),
        (dict(context_noise=float("nan")), "context_noise must be in \\[0, 10\\], got nan"),
    ],
)
def test_bad_options(pipes, bad, match):
    pipe = _pipe(pipes, first_with("nextstep11"))
    with pytest.raises(ValueError, match=match):
        pipe.generate("a dog", **{"size": (32, 32), "steps": 2, **bad})
    with pytest.raises(ValueError, match="non-empty"):
        pipe.generate("  ")


def test_context_noise_reaches_the_backbone_not_the_image(pipes):
    """The first token is sampled before anything is fed back; later ones see the noised context. The image
    holds the sampled tokens themselves: the same raw tokens give the same image with or without noise."""
    pipe = _pipe(pipes, first_with("nextstep11"))
    opts = dict(size=(32, 32), steps=3, cfg=3.0, seed=5)
    clean, noisy, again = Trace(), Trace(), Trace()
    pipe.generate("a dog", trace=clean, **opts)
    pipe.generate("a dog", trace=noisy, context_noise=0.5, **opts)
    pipe.generate("a dog", trace=again, context_noise=0.5, **opts)
    assert torch.equal(clean.raw_tokens[0], noisy.raw_tokens[0])
    assert not torch.equal(clean.conditions[1], noisy.conditions[1])
    assert all(torch.equal(a, b) for a, b in zip(noisy.raw_tokens, again.raw_tokens, strict=True))
    tokens = torch.stack(noisy.raw_tokens, dim=1)  # (B, h*w, D)
    side = opts["size"][0] // pipe.down_factor
    assert torch.allclose(pipe.decode_tokens(tokens, side, side), noisy.decoded, atol=1e-5)


def test_linear_schedule_through_scale_one(pipes):
    """A linear schedule can bring a guidance scale to exactly 1 mid-image; the branch count must not change."""
    pipe = _pipe(pipes, first_with("nextstep11"))
    source = Image.new("RGB", (32, 32), "blue")
    out = pipe.edit(source, "make it red", steps=2, cfg=3.0, cfg_img=2.0, cfg_schedule="linear", seed=0)
    assert out[0].size == (32, 32)
    out = pipe.generate("a dog", size=(32, 32), steps=2, cfg=1.5, cfg_schedule="linear", seed=0)
    assert out[0].size == (32, 32)


def test_prompt_limit_counts_text_not_source_placeholders(pipes, monkeypatch):
    """A large source image adds h*w placeholders to the prompt; only the text counts against the limit."""
    import nextstep.sampling.pipeline as pipeline_module

    pipe = _pipe(pipes, first_with("nextstep11"))
    monkeypatch.setattr(pipeline_module, "MAX_PROMPT_TOKENS", 8)
    source = Image.new("RGB", (64, 64), "blue")  # 4x4 = 16 placeholders > 8
    assert pipe.edit(source, "red", steps=1, cfg=1.0, cfg_img=1.0, seed=0)[0].size == (64, 64)
    with pytest.raises(ValueError, match="exceeds 8"):
        pipe.generate("a much longer prompt about a small red car on a road", size=(32, 32), steps=1)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_on_token_sees_every_token_and_can_stop(pipes, engine):
    """on_token gets the tokens so far after each image token, in both loops; raising in it stops the run."""
    pipe = _pipe(pipes, first_with("nextstep11"))
    opts = dict(size=(32, 32), steps=2, cfg=3.0, seed=1, engine=engine, n=2)
    seen = []
    trace = Trace() if engine == "eager" else None
    pipe.generate("a dog", on_token=lambda k, t: seen.append((k, t.clone())), trace=trace, **opts)
    n_tokens = (32 // pipe.down_factor) ** 2
    assert [k for k, _ in seen] == list(range(n_tokens))
    assert [t.shape[:2] for _, t in seen] == [(2, k + 1) for k in range(n_tokens)]
    assert torch.equal(seen[-1][1][:, :1], seen[0][1])  # earlier tokens are not rewritten
    if trace is not None:
        assert torch.equal(seen[-1][1], torch.stack(trace.raw_tokens, dim=1))

    def stop(k, tokens):
        if k == 1:
            raise _Stop

    with pytest.raises(_Stop):
        pipe.generate("a dog", on_token=stop, **opts)
    again = pipe.generate("a dog", **opts)  # a stopped run leaves the pipeline usable
    assert len(again) == 2
