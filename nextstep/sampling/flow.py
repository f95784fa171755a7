"""Flow-matching sampling of one image token: timestep schedules, ODE/SDE/CPS updates, guidance.

t = 0 is noise and t = 1 is data; x_t = t * x1 + (1 - t) * noise. Two official dialects:
"nextstep1" (NextStep-1 GitHub sampler: grid stops at 1 - last_step_size, Euler-Maruyama SDE, a
deterministic last step) and "nextstep11" (NextStep-1.1: grid ends at 1, Flow-GRPO SDE with
noise_level, CPS, ODE). Both are planned once as per-step coefficients (`plan_steps`) that every
sampling loop consumes. Every random draw goes through `draw`, so a run can be replayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

Rule = Literal["sde", "ode", "cps"]
Schedule = Literal["constant", "linear"]
RULES: dict[str, tuple[str, ...]] = {"nextstep1": ("sde", "ode"), "nextstep11": ("sde", "ode", "cps")}

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DrawFn = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class FlowSettings:
    family: str = "nextstep11"  # sampler dialect, from the model family
    num_steps: int = 30  # head integration steps per token
    shift: float = 1.0  # timestep shift s: t' = t / (s - (s - 1) t)
    rule: Rule = "sde"  # update rule
    noise_level: float = 0.8  # NextStep-1.1 SDE/CPS noise scale
    last_step_size: float = 0.04  # NextStep-1 final deterministic step
    # NextStep-1.1 SDE/CPS: the head steps that take the rule's noisy update; the others take the ODE step (c = 0)
    # but still draw, so the draw order is the rule's. None: every step is noisy. RL trains these steps.
    stochastic: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.family not in RULES:
            raise ValueError(f"unknown sampler family {self.family!r}")
        if self.num_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.num_steps}")
        if self.family == "nextstep1" and self.num_steps < 2:
            raise ValueError(f"NextStep-1 sampling needs steps >= 2, got {self.num_steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.rule not in RULES[self.family]:
            raise ValueError(
                f"sampler {self.rule!r} is not available for {self.family} checkpoints "
                f"(choose from {', '.join(RULES[self.family])})"
            )
        if self.stochastic is not None:
            if self.family != "nextstep11" or self.rule == "ode":
                raise ValueError(f"stochastic steps need a NextStep-1.1 sde or cps rule, got {self.family} {self.rule}")
            bad = [i for i in self.stochastic if not 0 <= i < self.num_steps]
            if bad or not self.stochastic:
                raise ValueError(f"stochastic steps must be a non-empty subset of 0..{self.num_steps - 1}, got {bad}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t / (shift - (shift - 1) * t)


def timesteps(s: FlowSettings) -> torch.Tensor:
    """float32 grid: NextStep-1 has num_steps points ending at 1 - last_step_size before the shift;
    NextStep-1.1 has num_steps + 1 points, the last one 1.0."""
    if s.family == "nextstep1":
        return shift_timesteps(torch.linspace(0, 1 - s.last_step_size, s.num_steps), s.shift)
    grid = shift_timesteps(torch.linspace(0, 1, s.num_steps + 1)[:-1], s.shift)
    return torch.cat([grid, torch.ones(1)])


def guidance_rows(cfg: float, cfg_img: float) -> int:
    """Condition rows per image: 1 (no guidance), 2 (text CFG), 3 (text + image CFG for editing)."""
    if cfg_img != 1.0:
        return 3
    return 2 if cfg != 1.0 else 1


def guidance_scale(family: str, schedule: Schedule, scale: float, done: int, total: int) -> float:
    """Guidance at the token with `done` tokens already made out of `total`."""
    if schedule == "constant" or scale == 1.0:
        return scale
    if schedule != "linear":
        raise ValueError(f"unknown guidance schedule {schedule!r} (constant or linear)")
    if family == "nextstep1":
        return 1 + (scale - 1) * (total - done) / total
    return max(scale / 2, 1 + (scale - 1) * done / total)


def guidance_table(family: str, opts, n_tokens: int) -> torch.Tensor:
    """(n_tokens, 2) float32 (cfg, cfg_img) per token: guidance_scale over the image, computed once."""
    scales = [
        [guidance_scale(family, opts.cfg_schedule, s, k, n_tokens) for s in (opts.cfg, opts.cfg_img)]
        for k in range(n_tokens)
    ]
    return torch.tensor(scales)


def combine_guidance(
    v: torch.Tensor, cfg: float, cfg_img: float, rows: int, *, normalize: bool = False
) -> torch.Tensor:
    """Merge stacked branch velocities (rows * B, D) -> (B, D).

    2 rows [cond; uncond]: v_u + cfg (v_c - v_u).
    3 rows [cond; image-only; none]: v_u2 + cfg_img (v_u1 - v_u2) + cfg (v_c - v_u1).
    normalize (NextStep-1.1): rescale so the guided norm never exceeds the conditional one.
    """
    if rows == 1:
        return v
    chunks = v.chunk(rows)
    cond = chunks[0]
    if rows == 2:
        out = chunks[1] + cfg * (cond - chunks[1])
    else:
        out = chunks[2] + cfg_img * (chunks[1] - chunks[2]) + cfg * (cond - chunks[1])
    if normalize:
        ratio = cond.norm(dim=-1, keepdim=True) / (out.norm(dim=-1, keepdim=True) + 1e-6)
        out = out * ratio.clamp(0, 1)
    return out


@dataclass(frozen=True)
class StepPlan:
    """Every update rule is affine in (x, v, eps): x' = a x + b v + c eps with (a, b, c) fixed by the time
    grid, so the eager loop, the engine and the fused update all run the same coefficients."""

    t: torch.Tensor  # (S,) float32 times at which the velocity is evaluated, one per step
    coef: tuple[tuple[float, float, float], ...]  # (a, b, c) per step, in float64
    num_eps: int  # the first num_eps steps each draw one eps (B, D), after the initial noise

    @property
    def num_draws(self) -> int:
        """(B, D) draws per token in order: initial noise, then one per noisy step."""
        return 1 + self.num_eps


def plan_steps(s: FlowSettings) -> StepPlan:
    """The update rules of both families as per-step coefficients, in float64 from the float32 grid.

    NextStep-1: SDE x' = x + (v + (1 - t) score) dt + sqrt(2 (1 - t) dt) eps with
    score = (t v - x) / ((1 - t)^2 + t (1 - t)), then one deterministic Euler step of last_step_size.
    NextStep-1.1 (x0 = x - t v, x1 = x + (1 - t) v): ODE x0 (1 - t') + x1 t'; Flow-GRPO SDE subtracts
    std^2 dt / (2 sigma) x0 and adds std sqrt(dt) eps; CPS keeps sqrt((1 - t')^2 - std^2) of x0.
    With `s.stochastic`, the steps outside it take the ODE coefficients (still drawing, times c = 0).
    """
    grid = timesteps(s)
    ts = grid.double().tolist()
    coef = []
    if s.family == "nextstep1":
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            dt = t_next - t
            if s.rule == "ode":
                coef.append((1.0, dt, 0.0))
                continue
            den = (1 - t) ** 2 + t * (1 - t)
            coef.append((1 - (1 - t) * dt / den, (1 + (1 - t) * t / den) * dt, math.sqrt(2 * (1 - t) * dt)))
        coef.append((1.0, s.last_step_size, 0.0))  # deterministic last step at ts[-1], no draw
        return StepPlan(grid, tuple(coef), 0 if s.rule == "ode" else len(coef) - 1)
    sigma_max = ts[-2]
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        dt = t_next - t
        if s.rule == "ode":
            coef.append((1.0, dt, 0.0))
        elif s.rule == "sde":
            sigma = 1 - t
            std = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * s.noise_level
            k = std**2 * dt / (2 * sigma)  # the drift correction applied to x0 = x - v t
            coef.append((1 - k, dt + k * t, std * math.sqrt(dt)))
        else:
            std = (1 - t_next) * math.sin(s.noise_level * math.pi / 2)
            keep = math.sqrt(max((1 - t_next) ** 2 - std**2, 0.0))
            coef.append((keep + t_next, -t * keep + (1 - t) * t_next, std))
    if s.stochastic is not None:
        ode = plan_steps(replace(s, rule="ode", stochastic=None)).coef
        coef = [c if i in s.stochastic else ode[i] for i, c in enumerate(coef)]
    return StepPlan(grid[:-1], tuple(coef), 0 if s.rule == "ode" else len(coef))


def guided_update(
    x: torch.Tensor,
    v: torch.Tensor,
    scales,
    eps: torch.Tensor | None,
    a: float,
    b: float,
    *,
    rows: int,
    normalize: bool,
) -> torch.Tensor:
    """One step of a plan: x (B, D) -> a x + b guide(v) (+ eps, already times c), v (rows * B, D) the branch
    velocities, scales this token's (cfg, cfg_img). head_kernels fuses the same arithmetic in one kernel."""
    g = combine_guidance(v, scales[0], scales[1], rows, normalize=normalize)
    x = x * a if eps is None else torch.add(eps, x, alpha=a)
    return x.add_(g, alpha=b)


def sample_token(
    velocity: VelocityFn,
    cond: torch.Tensor,
    settings: FlowSettings | StepPlan,
    *,
    cfg: float | torch.Tensor = 1.0,
    cfg_img: float | torch.Tensor = 1.0,
    normalize: bool = False,
    rows: int | None = None,
    token_dim: int,
    draw: DrawFn,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate one token per image from noise to data with the plan's coefficients.

    cond: (rows * B, cond_dim) head conditions, branches stacked [cond; uncond...];
    velocity(x (rows*B, D), t (rows*B,), cond) -> (rows*B, D); returns (B, D).
    The initial noise is `noise` or draw((B, D)); stochastic steps draw (B, D) each.
    rows: branches stacked in `cond`; default from (cfg, cfg_img). Pass it when a guidance schedule
    can bring a scale to 1 mid-image, so the row count stays that of the batch.
    settings: FlowSettings, or its plan_steps (with plan.t on cond's device) to skip per-token planning.
    """
    plan = plan_steps(settings) if isinstance(settings, FlowSettings) else settings
    rows = rows or guidance_rows(cfg, cfg_img)
    b = cond.shape[0] // rows
    ts = plan.t.to(cond.device)
    x = draw((b, token_dim)) if noise is None else noise  # (B, D)
    for i, (a, b_, c) in enumerate(plan.coef):
        v = velocity(x.repeat(rows, 1), ts[i].expand(rows * b).to(x.dtype), cond)
        eps = draw(tuple(x.shape)) * c if i < plan.num_eps else None
        x = guided_update(x, v, (cfg, cfg_img), eps, a, b_, rows=rows, normalize=normalize)
    return x
