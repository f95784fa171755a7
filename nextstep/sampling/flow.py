"""Flow-matching sampling of one image token: timestep schedules, ODE/SDE/CPS updates, guidance.

t = 0 is noise and t = 1 is data; x_t = t * x1 + (1 - t) * noise. Two official dialects:
"nextstep1" (NextStep-1 GitHub sampler: grid stops at 1 - last_step_size, Euler-Maruyama SDE, a
deterministic last step) and "nextstep11" (NextStep-1.1: grid ends at 1, Flow-GRPO SDE with
noise_level, CPS, ODE). Every random draw goes through `draw`, so a run can be replayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


def _nextstep11_step(rule: str, x, v, t, t_next, sigma_max, noise_level: float, draw: DrawFn) -> torch.Tensor:
    x0 = x - v * t  # noise estimate
    x1 = x + v * (1 - t)  # data estimate
    if rule == "ode":
        return x0 * (1 - t_next) + x1 * t_next
    eps = draw(tuple(x.shape))
    if rule == "sde":
        sigma, dt = 1 - t, t_next - t
        std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        return x0 * (1 - t_next) + x1 * t_next - std**2 * dt / (2 * sigma) * x0 + std * torch.sqrt(dt) * eps
    std = (1 - t_next) * math.sin(noise_level * math.pi / 2)
    return x0 * torch.sqrt((1 - t_next) ** 2 - std**2) + x1 * t_next + std * eps


def sample_token(
    velocity: VelocityFn,
    cond: torch.Tensor,
    settings: FlowSettings,
    *,
    cfg: float = 1.0,
    cfg_img: float = 1.0,
    normalize: bool = False,
    rows: int | None = None,
    token_dim: int,
    draw: DrawFn,
    noise: torch.Tensor | None = None,
    grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate one token per image from noise to data.

    cond: (rows * B, cond_dim) head conditions, branches stacked [cond; uncond...];
    velocity(x (rows*B, D), t (rows*B,), cond) -> (rows*B, D); returns (B, D).
    The initial noise is `noise` or draw((B, D)); stochastic rules draw (B, D) per step.
    rows: branches stacked in `cond`; default from (cfg, cfg_img). Pass it when a guidance schedule
    can bring a scale to 1 mid-image, so the row count stays that of the batch.
    """
    rows = rows or guidance_rows(cfg, cfg_img)
    b = cond.shape[0] // rows
    ts = (timesteps(settings) if grid is None else grid).to(cond.device)
    x = draw((b, token_dim)) if noise is None else noise  # (B, D)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(x.repeat(rows, 1), t.expand(rows * b).to(x.dtype), cond)
        return combine_guidance(v, cfg, cfg_img, rows, normalize=normalize)

    if settings.family == "nextstep1":
        for i in range(len(ts) - 1):
            t, dt = ts[i], ts[i + 1] - ts[i]
            v = guided(x, t)
            if settings.rule == "ode":
                x = x + v * dt
                continue
            score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
            drift = v + (1 - t) * score
            x = x + drift * dt + torch.sqrt(2 * (1 - t)) * draw(tuple(x.shape)) * torch.sqrt(dt)
        return x + guided(x, ts[-1]) * settings.last_step_size

    sigma_max = ts[-2]
    for i in range(len(ts) - 1):
        x = _nextstep11_step(
            settings.rule, x, guided(x, ts[i]), ts[i], ts[i + 1], sigma_max, settings.noise_level, draw
        )
    return x
