"""The flow-matching head: an adaLN MLP that predicts the velocity of one image token.

Module names follow the official `image_head.net.*` layout (MAR's SimpleMLPAdaLN, as NextStep uses it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw t in [0, 1] (not scaled by 1000), [cos, sin] order: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """adaLN (shift, 1 + scale, gate) from the (time + condition) embedding y (..., W)."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift, scale1, gate = mod
        return x + gate * self.mlp(self.in_ln(x) * scale1 + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return shift, 1 + scale

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift, scale1 = mod
        return self.linear(self.norm_final(x) * scale1 + shift)


class AdaLNMLP(nn.Module):
    """velocity = net(x_t (N, token_dim), t (N,), cond (N, cond_dim)) -> (N, token_dim)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.input_proj(x), self.modulations(self.time_embed(t) + self.cond_embed(cond)))

    def modulations(self, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every block's adaLN modulation, then the final layer's, from y (..., W). They depend on (t, cond)
        only: a sampler computes them for all its steps at once (y (S, N, W)) and indexes one step."""
        return [block.modulation(y) for block in self.res_blocks] + [self.final_layer.modulation(y)]

    def trunk(self, h: torch.Tensor, mods: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """velocity from the projected input h (N, W) and one step's modulations (each (N, W))."""
        for block, mod in zip(self.res_blocks, mods, strict=False):
            h = block(h, mod)
        return self.final_layer(h, mods[-1])

    def init_weights(self) -> None:
        """Zero-init adaLN modulation and the output layer so each block starts as identity, as in DiT."""
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)


class FlowMatchingHead(nn.Module):
    """Holds `net`; the rectified-flow training loss lives here, sampling in nextstep.sampling.flow."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.net = AdaLNMLP(token_dim, cond_dim, width, depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, cond)

    def loss(
        self,
        target: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor,
        *,
        batch_mul: int,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Rectified flow: x_t = t x + (1 - t) noise, v = x - noise, t ~ sigmoid(N(0, 1)).

        target (N, token_dim), cond (N, cond_dim), mask (N,); each row is repeated batch_mul times
        (tiled, like the official `repeat`) with independent noise and t. Draw order: noise, then t.
        """
        target, cond, mask = (torch.cat([a] * batch_mul) for a in (target, cond, mask))
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        if t is None:
            u = torch.randn(target.shape[0], generator=generator, device=target.device, dtype=torch.float32)
            t = torch.sigmoid(u).to(target.dtype)
        x_t = t[:, None] * target + (1 - t[:, None]) * noise
        pred = self.net(x_t, t, cond)
        per_row = F.mse_loss(pred.float(), (target - noise).float(), reduction="none").mean(-1)
        mask = mask.float()
        return (per_row * mask).sum() / (mask.sum() + 1e-8)
