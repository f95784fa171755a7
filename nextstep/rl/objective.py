"""The RL objective of flow-head post-training, as pure tensor functions: Gaussian log-densities of recorded
head transitions, group-relative advantages, the clipped policy-ratio loss and the KL term to the start model.

The math is Flow-GRPO's (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"): a
stochastic sampler step x' = a x + b v + c eps is a Gaussian policy N(a x + b v, c^2 I) over x', so its
log-density is differentiable in the velocity v (likewise for CPS, Wang & Yu 2025, "Coefficients-Preserving
Sampling for RL with Flow Matching": the same Gaussian with its own a, b, c; the constant terms cancel in every
ratio). Advantages and the clipped ratio loss are GRPO's (Shao et al. 2024, "DeepSeekMath", section 4.1) on top
of PPO's clipping (Schulman et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nextstep.sampling.flow import StepPlan


def trained_coefficients(plan: StepPlan, steps: Sequence[int]) -> torch.Tensor:
    """(S, 3) float64 (a, b, c) of the head steps `steps` of `plan`, in that order. Only stochastic steps
    (among the plan's first num_eps, with c > 0) have a density: ValueError naming a step that is not."""
    if not steps:
        raise ValueError("no trained steps given")
    for i in steps:
        if not 0 <= i < len(plan.coef):
            raise ValueError(f"trained step {i} is outside the plan's {len(plan.coef)} steps")
        if i >= plan.num_eps or plan.coef[i][2] == 0:
            raise ValueError(
                f"trained step {i} is deterministic (no noise, c = 0), so it has no log-density; train one of "
                f"the stochastic steps {[k for k in range(plan.num_eps) if plan.coef[k][2] > 0]}"
            )
    return torch.tensor([plan.coef[i] for i in steps], dtype=torch.float64)


def _split(coef: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (S, 3) -> three (S, 1) columns in `like`'s dtype, broadcasting over (..., S, D).
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef[:, 0:1], coef[:, 1:2], coef[:, 2:3]


def _at_least_fp32(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # A bf16 velocity would round the residual before it is squared and summed over D: the ratio of two such
    # log-densities is noise. float64 inputs stay float64.
    dtype = torch.promote_types(torch.result_type(*ts[:2]), torch.float32)
    return tuple(t.to(dtype) for t in ts)


def transition_mean(x: torch.Tensor, v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Mean a x + b v of the next state. x, v: (..., S, D), e.g. (B, N, S, D); coef (S, 3). -> (..., S, D)."""
    x, v = _at_least_fp32(x, v)
    a, b, _ = _split(coef, v)
    return a * x + b * v


def transition_log_prob(x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """log N(x_next; a x + b v, c^2 I) summed over the token dimension D, differentiable in v.

    x, v, x_next: (..., S, D), e.g. (B, N, S, D) = (images, tokens, trained steps, token dim), or flattened
    to (M, S, D); coef: (S, 3) from `trained_coefficients`. Returns (..., S), in float32 at least.
    """
    x, v, x_next = _at_least_fp32(x, v, x_next)
    _, _, c = _split(coef, v)
    d = x_next.shape[-1]
    resid = x_next - transition_mean(x, v, coef)  # (..., S, D)
    quad = (resid * resid).sum(-1) / (2 * c[:, 0] ** 2)  # (..., S)
    return -quad - d * torch.log(c[:, 0]) - d * 0.5 * math.log(2 * math.pi)


def kl_to_reference(x: torch.Tensor, v: torch.Tensor, v_ref: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_theta, c^2 I) || N(mean_ref, c^2 I)) = ||mean_theta - mean_ref||^2 / (2 c^2), summed over D,
    with v from the policy and v_ref from the starting model at the same states (Flow-GRPO's KL term).
    x, v, v_ref: (..., S, D); coef (S, 3). Returns (..., S), in float32 at least."""
    x, v, v_ref = _at_least_fp32(x, v, v_ref)
    _, _, c = _split(coef, v)
    diff = transition_mean(x, v, coef) - transition_mean(x, v_ref, coef)  # (..., S, D)
    return (diff * diff).sum(-1) / (2 * c[:, 0] ** 2)


def group_advantages(
    rewards: torch.Tensor, *, high: float | None = None, min_std: float = 1e-6, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages (r - group mean) / (group std + eps) of rewards (G, K): G prompts, K samples each.

    The std is the population one (over the K samples, as Flow-GRPO). NaN rewards (samples whose reward
    failed) are left out of their group's statistics. A group is dropped when all its rewards are >= `high`
    (nothing left to learn), its rewards spread less than `min_std` (by default: all equal, so no signal), or
    fewer than two are finite.
    Returns (advantages (G, K), kept (G, K) bool); dropped or NaN samples get advantage 0 and kept False.
    """
    finite = torch.isfinite(rewards)  # (G, K)
    r = torch.where(finite, rewards, torch.zeros_like(rewards))
    n = finite.sum(1, keepdim=True)  # (G, 1)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)
    std = ((torch.where(finite, r - mean, torch.zeros_like(r)) ** 2).sum(1, keepdim=True) / n.clamp(min=1)).sqrt()
    keep_group = (n >= 2) & (std >= min_std)  # (G, 1)
    if high is not None:
        keep_group &= ~torch.where(finite, r >= high, torch.ones_like(finite)).all(1, keepdim=True)
    kept = keep_group & finite  # (G, K)
    adv = torch.where(kept, (r - mean) / (std + eps), torch.zeros_like(r))
    return adv, kept


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kept: torch.Tensor,
    *,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped surrogate: mean of -min(ratio A, clip(ratio, 1 - clip, 1 + clip) A) over the kept
    samples and every ratio, with ratio = exp(log_prob - old_log_prob).

    log_prob, old_log_prob: (B, *R), one ratio per entry: (B, S) for one per image and trained step
    (log-densities summed over tokens, as Flow-GRPO), or (B, N, S) for one per token and step (token-level,
    as GRPO on text); advantages, kept: (B,) (group_advantages flattened, group-major).
    Returns (loss (), clip fraction ()): the share of kept ratios outside [1 - clip, 1 + clip]. With no kept
    sample the loss is a zero that still carries the graph.
    """
    ratio = torch.exp(log_prob - old_log_prob)  # (B, *R)
    shape = (-1,) + (1,) * (ratio.dim() - 1)
    adv = advantages.reshape(shape).to(ratio.dtype)
    mask = kept.reshape(shape).to(ratio.dtype).expand_as(ratio)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    count = mask.sum().clamp(min=1)
    loss = -(surrogate * mask).sum() / count
    clipped = ((ratio - 1).abs() > clip).to(ratio.dtype)
    return loss, (clipped * mask).sum().detach() / count
