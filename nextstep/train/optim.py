"""Optimizer and learning-rate schedule: AdamW with per-module lr multipliers and no decay on biases and
norms; warm-up then cosine, constant or warmup-stable-decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from nextstep.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with groups per (lr multiplier, decay): biases and norms (ndim < 2) are not decayed."""
    o = cfg.optim
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    matched = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        mult = 1.0
        for prefix, m in o.module_lr.items():
            if clean.startswith(prefix):
                mult = m
                matched.add(prefix)
        groups.setdefault((mult, p.ndim >= 2), []).append(p)
    unmatched = set(o.module_lr) - matched
    if unmatched:
        raise ValueError(f"optim.module_lr prefixes {sorted(unmatched)} match no trainable parameter")
    if not groups:
        raise ValueError("no trainable parameters (check training.train_modules / lora)")
    param_groups = [
        {"params": ps, "lr": o.lr * mult, "lr_mult": mult, "weight_decay": o.weight_decay if decay else 0.0}
        for (mult, decay), ps in sorted(groups.items())
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at max_steps, constant, or wsd: constant until
    the last decay_steps, then linear down to min_lr_ratio at max_steps."""
    o, total = cfg.optim, cfg.training.max_steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "wsd":
        left = total - step  # steps still to take, this one included
        return 1.0 if left >= o.decay_steps else o.min_lr_ratio + (1 - o.min_lr_ratio) * max(0, left) / o.decay_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a LambdaLR over every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
