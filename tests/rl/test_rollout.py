"""Rollouts: the recorded transitions are the rule's Gaussian steps (analytic log-density of the draws), the
parallel teacher-forced recompute equals the log-probabilities recorded while sampling (fp32, CPU) for SDE and
CPS, text-to-image and edit rows alike, and it is differentiable in the model's parameters; edit rows condition
on their source as Pipeline.edit does; the other head steps stay deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.model.checkpoint import from_pretrained
from nextstep.rl.rollout import policy_log_prob, sample_rollout
from nextstep.sampling.engine import Recording
from nextstep.sampling.flow import FlowSettings, plan_steps
from nextstep.sampling.pipeline import Pipeline
from tests.refs import ROOT

PROMPTS = ["a red circle", "a red circle", "two blue squares on the left", "two blue squares on the left"]
STEPS = (1, 3)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return Pipeline.from_pretrained(ROOT / "nextstep11-tiny", device="cpu", dtype=torch.float32)


def _settings(rule: str, stochastic: tuple[int, ...] = STEPS) -> FlowSettings:
    return FlowSettings(family="nextstep11", num_steps=5, rule=rule, noise_level=0.8, stochastic=stochastic)


def _source(seed: int, side: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("rule", "edits"), [("sde", False), ("cps", False), ("sde", True)])
def test_recompute_equals_recorded_and_is_differentiable(pipe, rule, edits):
    """With `edits`, rows 2 and 3 edit source images (of another size: resized as Pipeline.edit does), whose
    tokens the recompute must read in the prompt."""
    size = (2 * pipe.down_factor, 2 * pipe.down_factor)  # 2 x 2 image tokens
    sources = [None, None, _source(0, 48), _source(1, 48)] if edits else None
    ro, images = sample_rollout(pipe, PROMPTS, _settings(rule), size=size, seed=3, sources=sources)
    assert ro.source_tokens.shape == ((8 if edits else 0), pipe.model.config.token_dim)
    b, n, s, d = ro.record.x.shape
    assert (b, n, s) == (4, 4, 2) and len(images) == 4 and images[0].size == (size[1], size[0])
    # Recorded: x' = a x + b v + c eps exactly, so the log-density is the analytic one of the standard draw.
    a, b_, c = (ro.coef[:, k, None].float() for k in range(3))
    eps = (ro.record.x_next - a * ro.record.x - b_ * ro.record.v) / c  # (B, N, S, D)
    analytic = -0.5 * (eps * eps).sum(-1) - d * torch.log(c[:, 0]) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(ro.log_prob, analytic, rtol=1e-5, atol=1e-3)
    assert 0.5 < eps.std() < 1.5  # the draws are standard normals, not zeros
    # The parallel recompute under the same weights (a model no engine has fused) equals the sampled ones.
    model = from_pretrained(ROOT / "nextstep11-tiny", dtype=torch.float32)
    lp, v = policy_log_prob(model, ro)
    torch.testing.assert_close(v, ro.record.v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp, ro.log_prob, rtol=1e-6, atol=1e-4)
    # Differentiable in the backbone and the head.
    lp.sum().backward()
    for name in ("layers.0.self_attn.q_proj.weight", "image_head.net.input_proj.weight", "image_in_projector.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_edit_rows_sample_what_pipeline_edit_samples(pipe):
    """Every head step stochastic is the plain SDE sampler: an edit row of a rollout is then Pipeline.edit's
    sample for the same seed without guidance, so the source conditions the rollout exactly as an edit."""
    size = (2 * pipe.down_factor, 2 * pipe.down_factor)
    src, instruction = _source(2, size[0]), "make the red circle blue"
    settings = _settings("sde", stochastic=tuple(range(5)))
    _, images = sample_rollout(pipe, [instruction], settings, size=size, seed=11, sources=[src])
    (edited,) = pipe.edit(
        src, instruction, cfg=1.0, cfg_img=1.0, steps=5, sampler="sde", noise_level=0.8, shift=settings.shift,
        use_norm=False, context_noise=0.0, size=size, seed=11,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(edited))
    (text_only,) = sample_rollout(pipe, [instruction], settings, size=size, seed=11)[1]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(text_only))  # the source did condition it
    with pytest.raises(ValueError, match="got 2 sources for 1 prompts"):
        sample_rollout(pipe, [instruction], settings, size=size, seed=11, sources=[src, src])


def test_untrained_steps_are_deterministic_and_replays_agree(pipe):
    """Steps outside `stochastic` take the ODE coefficients; the recorded rollout reproduces for a seed, and a
    plan without recording samples the same tokens."""
    settings = _settings("sde")
    plan, ode = plan_steps(settings), plan_steps(FlowSettings(family="nextstep11", num_steps=5, rule="ode"))
    full = plan_steps(FlowSettings(family="nextstep11", num_steps=5, rule="sde", noise_level=0.8))
    for i in range(5):
        assert plan.coef[i] == (full.coef[i] if i in STEPS else ode.coef[i])
    assert plan.num_draws == full.num_draws  # the draw order is the rule's
    size = (2 * pipe.down_factor, 2 * pipe.down_factor)
    ro1, _ = sample_rollout(pipe, PROMPTS[:2], settings, size=size, seed=7)
    ro2, _ = sample_rollout(pipe, PROMPTS[:2], settings, size=size, seed=7)
    torch.testing.assert_close(ro1.tokens, ro2.tokens, rtol=0, atol=0)
    ids, mask = ro1.input_ids, ro1.attention_mask
    opts = pipe.engine
    from nextstep.sampling.options import GenerateOptions

    o = GenerateOptions(size=size, steps=5, cfg=1.0, seed=7)
    plain = opts(o).generate(ids, mask, torch.zeros(0, 64), settings, o, n_tokens=4, seed=7)
    torch.testing.assert_close(plain, ro1.tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="without guidance"):
        g = GenerateOptions(size=size, steps=5, cfg=3.0, seed=7)
        opts(g).generate(
            torch.cat([ids, ids]),
            torch.cat([mask, mask]),
            torch.zeros(0, 64),
            settings,
            g,
            n_tokens=4,
            seed=7,
            record=Recording(STEPS),
        )


def test_stochastic_steps_are_checked():
    with pytest.raises(ValueError, match="subset of 0..4, got \\[5\\]"):
        FlowSettings(family="nextstep11", num_steps=5, stochastic=(1, 5))
    with pytest.raises(ValueError, match="sde or cps"):
        FlowSettings(family="nextstep11", num_steps=5, rule="ode", stochastic=(1,))


@pytest.mark.gpu
def test_fast_engine_records_what_eager_records():
    """On the GPU the rollouts run on the CUDA-graph engine with the fused head kernels: the same transitions
    and log-densities as the eager engine (bf16 weights), and the recompute agrees with both."""
    pipe = Pipeline.from_pretrained(ROOT / "nextstep11-tiny", device="cuda", dtype=torch.bfloat16)
    size = (2 * pipe.down_factor, 2 * pipe.down_factor)
    fast, _ = sample_rollout(pipe, PROMPTS, _settings("sde"), size=size, seed=3)
    pipe.defaults["engine"] = "eager"
    eager, _ = sample_rollout(pipe, PROMPTS, _settings("sde"), size=size, seed=3)
    torch.testing.assert_close(fast.record.x, eager.record.x, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.log_prob, eager.log_prob, rtol=1e-2, atol=0.5)
    model = from_pretrained(ROOT / "nextstep11-tiny", dtype=torch.bfloat16, device="cuda")
    lp, _ = policy_log_prob(model, fast)
    torch.testing.assert_close(lp, fast.log_prob, rtol=1e-2, atol=0.5)
