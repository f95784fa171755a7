"""The RL objective: transition log-densities against torch.distributions for real plans of both sampler
families, advantages, group filtering and clipping on hand-made numbers, and the KL term."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from nextstep.rl.objective import (
    clipped_policy_loss,
    group_advantages,
    kl_to_reference,
    trained_coefficients,
    transition_log_prob,
)
from nextstep.sampling.flow import FlowSettings, plan_steps

PLANS = {
    "nextstep11-sde": FlowSettings(family="nextstep11", rule="sde", noise_level=0.8, num_steps=10),
    "nextstep11-cps": FlowSettings(family="nextstep11", rule="cps", noise_level=0.8, num_steps=10),
    "nextstep1-sde": FlowSettings(family="nextstep1", rule="sde", num_steps=10, shift=2.0),
}


def _stochastic(plan):
    return [i for i in range(plan.num_eps) if plan.coef[i][2] > 0]


@pytest.mark.parametrize("name", PLANS)
def test_log_prob_is_the_gaussian_of_every_stochastic_step(name):
    """(B, N, S, D) states through a real plan's steps: equal to Normal(a x + b v, c).log_prob summed over D,
    and the gradient in v is the analytic b (x' - mean) / c^2."""
    plan = plan_steps(PLANS[name])
    steps = _stochastic(plan)
    assert len(steps) >= 9  # every step but (at most) a deterministic last one
    coef = trained_coefficients(plan, steps)
    g = torch.Generator().manual_seed(0)
    b_, n, s, d = 2, 3, len(steps), 5
    x = torch.randn(b_, n, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b_, n, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    a, b, c = (coef[:, k, None] for k in range(3))  # (S, 1)
    x_next = a * x + b * v.detach() + c * torch.randn(b_, n, s, d, generator=g, dtype=torch.float64)
    lp = transition_log_prob(x, v, x_next, coef)
    assert lp.shape == (b_, n, s)
    want = Normal(a * x + b * v.detach(), c.expand(s, d)).log_prob(x_next).sum(-1)
    torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-10)
    lp.sum().backward()
    torch.testing.assert_close(v.grad, b * (x_next - a * x - b * v.detach()) / c**2)
    flat = transition_log_prob(x.flatten(0, 1), v.detach().flatten(0, 1), x_next.flatten(0, 1), coef)
    torch.testing.assert_close(flat, want.flatten(0, 1), rtol=1e-12, atol=1e-10)


def test_log_prob_in_float32_follows_the_inputs():
    plan = plan_steps(PLANS["nextstep11-sde"])
    coef = trained_coefficients(plan, [0, 4])
    x, v, x_next = (torch.randn(4, 2, 8) for _ in range(3))
    lp = transition_log_prob(x, v, x_next, coef)
    assert lp.dtype == torch.float32
    want = transition_log_prob(x.double(), v.double(), x_next.double(), coef)
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-4)
    bf16 = transition_log_prob(x.bfloat16(), v.bfloat16(), x_next.bfloat16(), coef)  # computed in float32
    assert bf16.dtype == torch.float32
    want = transition_log_prob(x.bfloat16().float(), v.bfloat16().float(), x_next.bfloat16().float(), coef)
    torch.testing.assert_close(bf16, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("settings", "step", "match"),
    [
        (PLANS["nextstep1-sde"], 9, "step 9 is deterministic"),  # NextStep-1's final Euler step
        (PLANS["nextstep11-cps"], 9, "step 9 is deterministic"),  # CPS ends with std = 0 at t = 1
        (FlowSettings(family="nextstep11", rule="ode", num_steps=10), 0, "step 0 is deterministic"),
        (PLANS["nextstep11-sde"], 10, "outside the plan's 10 steps"),
    ],
)
def test_deterministic_or_missing_steps_have_no_density(settings, step, match):
    with pytest.raises(ValueError, match=match):
        trained_coefficients(plan_steps(settings), [0, step] if settings.rule != "ode" else [step])


def test_group_advantages_on_hand_made_rewards():
    rewards = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0],  # mean 0.5, std 0.5: +-1
            [1.0, 1.0, 1.0, 1.0],  # all high: dropped
            [0.3, 0.3, 0.3, 0.31],  # std 0.0043 < min_std: dropped
            [0.0, 3.0, float("nan"), 0.0],  # NaN left out: mean 1, std sqrt(2)
            [float("nan"), 0.2, float("nan"), float("nan")],  # one finite reward: dropped
        ]
    )
    adv, kept = group_advantages(rewards, high=1.0, min_std=0.01, eps=0.0)
    r2 = 2**0.5
    want = torch.tensor(
        [
            [1.0, -1.0, 1.0, -1.0],
            [0.0] * 4,
            [0.0] * 4,
            [-1 / r2, 2 / r2, 0.0, -1 / r2],
            [0.0] * 4,
        ]
    )
    torch.testing.assert_close(adv, want)
    assert kept.tolist() == [[True] * 4, [False] * 4, [False] * 4, [True, True, False, True], [False] * 4]
    adv, kept = group_advantages(rewards[:3], eps=0.5)  # defaults: no high threshold, min_std 1e-6
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, 0.5, -0.5]))
    assert kept[:, 0].tolist() == [True, False, True]  # the uniform group carries no signal: dropped anyway
    torch.testing.assert_close(adv[2], (rewards[2] - 0.3025) / (0.0043301 + 0.5), rtol=0, atol=1e-6)


def test_clipped_loss_and_clip_fraction_on_hand_made_numbers():
    """Ratios 1.5, 0.5, 1.1 and 0.9 with clip 0.2, advantages +1, -1, +2, -2; the last sample is dropped."""
    ratios = torch.tensor([[1.5, 1.0], [0.5, 1.0], [1.1, 1.0], [0.9, 1.0], [3.0, 3.0]])
    old = torch.randn(5, 2)
    new = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 5.0])
    kept = torch.tensor([True, True, True, True, False])
    loss, clip_frac = clipped_policy_loss(new, old, adv, kept, clip=0.2)
    # min(r A, clip(r) A): 1.2 | 1.0 ; -0.8 | -1.0 ; 2.2 | 2.0 ; -1.8 | -2.0  -> sum 0.8 over 8 entries
    torch.testing.assert_close(loss, torch.tensor(-0.8 / 8))
    torch.testing.assert_close(clip_frac, torch.tensor(2 / 8))  # 1.5 and 0.5 clipped
    loss.backward()
    # Gradient flows only where the ratio is not clipped (d/dlogp of -r A / 8 = -r A / 8); none from the dropped.
    want = -torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.2, 2.0], [-1.8, -2.0], [0.0, 0.0]]) / 8
    torch.testing.assert_close(new.grad, want)


def test_clipped_loss_takes_per_token_ratios_and_no_kept_samples():
    old = torch.zeros(2, 3, 4)  # (B, N, S)
    new = torch.full((2, 3, 4), 0.1, requires_grad=True)
    loss, frac = clipped_policy_loss(new, old, torch.tensor([1.0, 0.5]), torch.tensor([True, True]), clip=0.2)
    torch.testing.assert_close(loss, -0.75 * torch.tensor(0.1).exp())  # mean over all 24 ratios of r A
    assert frac.item() == 0.0
    loss, frac = clipped_policy_loss(new, old, torch.ones(2), torch.zeros(2, dtype=torch.bool), clip=0.2)
    assert (loss.item(), frac.item()) == (0.0, 0.0)
    loss.backward()  # still differentiable
    assert new.grad.abs().sum().item() == 0.0


def test_kl_is_zero_at_equal_means_and_matches_the_analytic_gaussian_kl():
    plan = plan_steps(PLANS["nextstep11-cps"])
    coef = trained_coefficients(plan, [1, 5])
    g = torch.Generator().manual_seed(1)
    x, v, v_ref = (torch.randn(3, 2, 6, generator=g, dtype=torch.float64) for _ in range(3))
    assert kl_to_reference(x, v, v, coef).abs().max().item() == 0.0
    kl = kl_to_reference(x, v, v_ref, coef)
    a, b, c = (coef[:, k, None] for k in range(3))
    want = kl_divergence(Normal(a * x + b * v, c.expand(2, 6)), Normal(a * x + b * v_ref, c.expand(2, 6))).sum(-1)
    torch.testing.assert_close(kl, want)
    torch.testing.assert_close(kl, (b[:, 0] ** 2) * ((v - v_ref) ** 2).sum(-1) / (2 * c[:, 0] ** 2))
