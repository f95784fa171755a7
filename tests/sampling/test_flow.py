"""Sampler parity: schedules, every update rule, guidance combinations (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from nextstep.model.checkpoint import from_pretrained
from nextstep.sampling.flow import (
    FlowSettings,
    combine_guidance,
    guidance_scale,
    plan_steps,
    sample_token,
    timesteps,
)
from tests.refs import dirs_with, max_diff, meta, tensors

ATOL = 1e-5


@pytest.mark.parametrize("ref", dirs_with("nextstep11"), ids=lambda p: p.name)
def test_nextstep11_every_sampler_run(ref):
    """Each recorded image_head.sample call: the x entering every step, the timesteps and the result."""
    net = from_pretrained(ref).image_head.net
    c = tensors(ref, "sampler.safetensors")
    runs = {k: v for k, v in meta(ref)["c"].items() if k != "c.noise_none"}
    assert len(runs) == 12
    for name, info in runs.items():
        settings = FlowSettings(
            family="nextstep11",
            num_steps=info["num_sampling_steps"],
            shift=info["timesteps_shift"],
            rule=info["sde_type"],
            noise_level=info["noise_level"],
        )
        assert max_diff(timesteps(settings), c[f"{name}.timesteps"]) < 1e-7, name
        draws = list(c[f"{name}.randn"]) if f"{name}.randn" in c else []
        assert len(draws) == info["n_randn_draws"]
        seen = []

        def velocity(x, t, cond, seen=seen, rows=c[info["noise"]].shape[0]):
            seen.append(x[:rows].clone())
            return net(x, t, cond)

        with torch.no_grad():
            out = sample_token(
                velocity,
                c[info["c"]],
                settings,
                cfg=info["cfg"],
                cfg_img=info["cfg_img"],
                token_dim=64,
                draw=lambda shape, d=draws: d.pop(0),
                noise=c[info["noise"]],
            )
        assert not draws, f"{name}: {len(draws)} draws left unused"
        assert max_diff(torch.stack(seen), c[f"{name}.step_x"]) < ATOL, name
        assert max_diff(out, c[f"{name}.result"]) < ATOL, name


@pytest.mark.parametrize("ref", dirs_with("nextstep11"), ids=lambda p: p.name)
def test_nextstep11_initial_noise_from_generator(ref):
    """noise=None: draw 0 is the initial noise, then one draw per step, all from one seeded generator."""
    net = from_pretrained(ref).image_head.net
    c = tensors(ref, "sampler.safetensors")
    info = meta(ref)["c"]["c.noise_none"]
    gen = torch.Generator().manual_seed(info["torch.manual_seed"])
    settings = FlowSettings(family="nextstep11", num_steps=info["num_sampling_steps"], rule=info["sde_type"])
    with torch.no_grad():
        out = sample_token(
            net,
            c[info["c"]],
            settings,
            cfg=info["cfg"],
            token_dim=64,
            draw=lambda shape: torch.randn(shape, generator=gen),
        )
    assert max_diff(out, c["c.noise_none.result"]) < ATOL


@pytest.mark.parametrize("ref", dirs_with("nextstep11"), ids=lambda p: p.name)
def test_nextstep11_guidance(ref):
    b = tensors(ref, "head.safetensors")
    info = meta(ref)["b"]
    v = b["b.cfg_in_velocity"]
    for norm in (False, True):
        suffix = "norm" if norm else "nonorm"
        two = combine_guidance(v[:4], info["cfg2"]["cfg"], 1.0, 2, normalize=norm)
        three = combine_guidance(v, info["cfg3"]["cfg"], info["cfg3"]["cfg_img"], 3, normalize=norm)
        assert max_diff(two, b[f"b.cfg2_{suffix}"]) < ATOL
        assert max_diff(three, b[f"b.cfg3_{suffix}"]) < ATOL
        # forward_head: the head over stacked [cond; uncond] rows, then guidance
        model = from_pretrained(ref)
        with torch.no_grad():
            cond = model.head_condition(b["b.c"].squeeze(1))
            vel = model.image_head.net(b["b.x"], b["b.t"], cond)
        assert max_diff(combine_guidance(vel, 3.0, 1.0, 2, normalize=norm), b[f"b.forward_head_cfg2_{suffix}"]) < ATOL


@pytest.mark.parametrize("ref", dirs_with("nextstep1"), ids=lambda p: p.name)
def test_nextstep1_timesteps_and_sde_replay(ref):
    """Replay each token's head sampling from the recorded draws and conditions."""
    net = from_pretrained(ref).image_head.net
    for name, info in meta(ref)["e_sampler"].items():
        e = tensors(ref, f"e_sampler_{name}.safetensors")
        settings = FlowSettings(
            family="nextstep1",
            num_steps=info["num_sampling_steps"],
            shift=info["timesteps_shift"],
            last_step_size=info["last_step_size"],
        )
        assert max_diff(timesteps(settings), e["timesteps"]) < 1e-7
        assert max_diff(timesteps(settings), torch.tensor(info["timesteps"])) < 1e-7
        for k in range(e["noise_draws"].shape[0]):
            draws = list(e["noise_draws"][k])
            with torch.no_grad():
                token = sample_token(
                    net,
                    e["head_cond_per_token"][:, k],
                    settings,
                    cfg=info["cfg"],
                    token_dim=64,
                    draw=lambda shape, d=draws: d.pop(0),
                )
            assert not draws
            assert max_diff(token, e["head_sample_per_token"][:, k]) < ATOL, (name, k)


def test_guidance_schedules_and_scale_one():
    assert guidance_scale("nextstep11", "constant", 7.5, 3, 10) == 7.5
    assert guidance_scale("nextstep1", "linear", 7.5, 0, 10) == 7.5
    assert guidance_scale("nextstep1", "linear", 7.5, 10, 10) == 1.0
    assert guidance_scale("nextstep11", "linear", 7.5, 0, 10) == 3.75
    assert guidance_scale("nextstep11", "linear", 7.5, 10, 10) == 7.5
    torch.manual_seed(0)
    v = torch.randn(4, 8)
    assert torch.allclose(combine_guidance(v, 1.0, 1.0, 2), v[:2], atol=1e-6)  # scale 1 = conditional


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        FlowSettings(num_steps=0)
    with pytest.raises(ValueError, match="cps"):
        FlowSettings(family="nextstep1", rule="cps")
    with pytest.raises(ValueError, match="shift"):
        FlowSettings(shift=-1)


def test_last_step_size_and_grid_ends():
    ts = timesteps(FlowSettings(family="nextstep1", num_steps=5, last_step_size=0.1))
    assert ts[0] == 0 and abs(ts[-1].item() - 0.9) < 1e-6 and len(ts) == 5
    ts = timesteps(FlowSettings(family="nextstep11", num_steps=5, shift=3.0))
    assert ts[0] == 0 and ts[-1] == 1.0 and len(ts) == 6


@pytest.mark.parametrize("family,rule", [("nextstep11", "sde"), ("nextstep11", "cps"), ("nextstep1", "sde")])
def test_plan_matches_sample_token(family, rule):
    """The affine step coefficients reproduce flow.sample_token for a velocity that depends on x."""
    s = FlowSettings(family=family, num_steps=7, shift=2.5, rule=rule)
    plan = plan_steps(s)
    noise = torch.randn(plan.num_draws, 3, 8, dtype=torch.float64)
    it = iter(noise)

    def velocity(x, t, c):
        return torch.sin(x * 1.3 + t[:, None]) + c

    cond = torch.randn(3, 8, dtype=torch.float64)
    ref = sample_token(velocity, cond, s, token_dim=8, draw=lambda shape: next(it))
    x = noise[0]
    for i, (a, b, c) in enumerate(plan.coef):
        v = velocity(x, plan.t[i].double().expand(3), cond)
        x = a * x + b * v + (c * noise[1 + i] if i < plan.num_eps else 0)
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)
    assert next(it, None) is None, "the plan must consume exactly the eager draws"
