"""Rollouts of RL post-training and the policy's log-densities of them.

`sample_rollout`: images sampled token by token without guidance on the pipeline's engine (CUDA graphs on GPU,
eager on CPU), with a stochastic rule at the trained head steps and the head's transitions there recorded
(engine.Recording); text-to-image and edit rows (a source image in the prompt, as Pipeline.edit) in one batch.
`policy_log_prob`: the same transitions scored by a model in one teacher-forced forward, the backbone once over
[prompt with its source tokens, image tokens as fed back], then the head at every recorded state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import nn

from nextstep.model.nextstep import build_attention_mask_for_padding
from nextstep.model.vae import pil_to_pixels, pixels_to_pil
from nextstep.rl.objective import trained_coefficients, transition_log_prob
from nextstep.sampling.engine import Engine, Recording
from nextstep.sampling.flow import FlowSettings, plan_steps
from nextstep.sampling.options import GenerateOptions
from nextstep.sampling.pipeline import Pipeline


@dataclass
class Rollout:
    """B sampled images with what the policy gradient needs of them."""

    input_ids: torch.Tensor  # (B, L) left-padded prompt rows, each ending with <|image_area|>h*w boi
    attention_mask: torch.Tensor  # (B, L) 1 on prompt tokens, 0 on padding
    source_tokens: torch.Tensor  # (M, D) tokens of the edit rows' source images filling input_ids' placeholders
    tokens: torch.Tensor  # (B, N, D) image tokens as the backbone read them back
    record: Recording  # x, v, x_next (B, N, S, D) at the trained head steps
    t: torch.Tensor  # (S,) float32 time of each trained step
    coef: torch.Tensor  # (S, 3) float64 (a, b, c) of each trained step
    log_prob: torch.Tensor  # (B, N, S) log-density of each recorded transition under the sampling weights
    grid: tuple[int, int]  # (h, w) image tokens


def sample_rollout(
    pipe: Pipeline,
    prompts: list[str],
    settings: FlowSettings,
    *,
    size: tuple[int, int],
    seed: int,
    sources: list[Image.Image | None] | None = None,
    engine: Engine | None = None,
) -> tuple[Rollout, list[Image.Image]]:
    """One image per prompt (repeat a prompt G times for a group), no guidance, seeded draws. settings.stochastic
    names the trained steps (the others deterministic). sources[i], where given, makes row i an edit of that
    image by the instruction prompts[i], conditioned as Pipeline.edit does. `engine` samples (default: the
    pipeline's). Returns the rollout (on the model's device) and images."""
    if not settings.stochastic:
        raise ValueError("a rollout needs FlowSettings.stochastic: the head steps to train")
    steps = tuple(sorted(settings.stochastic))
    opts = replace(
        GenerateOptions(**pipe.defaults),
        size=size,
        steps=settings.num_steps,
        cfg=1.0,
        cfg_img=1.0,
        context_noise=0.0,  # the teacher-forced forward reads the tokens exactly as sampled
        n=1,
        seed=seed,
    )
    sources = sources or [None] * len(prompts)
    if len(sources) != len(prompts):
        raise ValueError(f"got {len(sources)} sources for {len(prompts)} prompts")
    inputs = [
        (p, None) if src is None else pipe.edit_input(src, p, size) for p, src in zip(prompts, sources, strict=True)
    ]
    input_ids, mask = pipe.tokenize([text for text, _ in inputs], size)
    dev = pipe.model.embed_tokens.weight.device
    h, w = pipe.grid(size)
    with torch.no_grad():  # ordinary tensors (not inference ones): the teacher-forced forward reads them
        source_tokens = pipe.encode_images([pil_to_pixels(src) for _, src in inputs if src is not None])
    record = Recording(steps)
    tokens = (engine or pipe.engine(opts)).generate(
        input_ids, mask, source_tokens, settings, opts, n_tokens=h * w, seed=seed, record=record
    )  # (B, N, D)
    # The engine runs in inference mode; clones are ordinary tensors that autograd may save.
    tokens = tokens.clone()
    record.x, record.v, record.x_next = (r.clone() for r in (record.x, record.v, record.x_next))
    plan = plan_steps(settings)
    coef = trained_coefficients(plan, steps)
    log_prob = transition_log_prob(record.x, record.v, record.x_next, coef)
    t = plan.t[list(steps)]
    images = [pixels_to_pil(x) for x in pipe.decode_tokens(tokens, h, w)]
    rollout = Rollout(input_ids.to(dev), mask.to(dev), source_tokens, tokens, record, t, coef, log_prob, (h, w))
    return rollout, images


def policy_log_prob(model: nn.Module, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-densities (B, N, S), velocities (B, N, S, D)) of the rollout's recorded transitions under `model`,
    differentiable in its parameters: conditions from one causal forward over [prompt (with the edit rows'
    source tokens), tokens], the head at
    each recorded (x, t). The same positions and padding mask as the engine's cache, so equal weights give
    the log-densities recorded while sampling."""
    b, n, d = ro.tokens.shape
    s = ro.t.shape[0]
    placeholder = model.config.image_placeholder_id
    fed_back = ro.input_ids.new_full((b, n), placeholder)  # (B, N)
    mask = torch.cat([ro.attention_mask, ro.attention_mask.new_ones(b, n)], 1)  # (B, L + N)
    embeds = torch.cat(
        [model.embed(ro.input_ids, ro.source_tokens), model.embed(fed_back, ro.tokens.reshape(-1, d))], 1
    )
    hidden = model.forward_hidden(embeds, mask=build_attention_mask_for_padding(mask))  # (B, L + N, d)
    first = ro.input_ids.shape[1] - 1  # the hidden state before image token 0 (at boi)
    cond = model.head_condition(hidden[:, first : first + n])  # (B, N, d)
    cond = cond[:, :, None].expand(b, n, s, cond.shape[-1]).reshape(b * n * s, -1)
    t = ro.t.to(cond.device, cond.dtype).expand(b * n, s).reshape(-1)  # the engine embeds t in the model dtype
    v = model.image_head.net(ro.record.x.reshape(b * n * s, d).to(cond.dtype), t, cond).float().reshape(b, n, s, d)
    return transition_log_prob(ro.record.x, v, ro.record.x_next, ro.coef), v
