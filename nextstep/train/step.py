"""One training step of the NextStep objective (LM loss on text, flow matching on image tokens), torchtitan
style: `forward_backward_step` on one micro-batch, `train_step` for one optimizer step (gradient
accumulation, clipping, optimizer and schedule). Another training mode supplies its own step with the same
signature (`StepFn`) and keeps the build, checkpoint and log of the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from nextstep.data.buckets import normalize_pixels
from nextstep.model.nextstep import patchify
from nextstep.model.vae import AutoEncoder
from nextstep.train.metrics import StepOutput, train_flops
from nextstep.train.noise import flow_noise, input_noise
from nextstep.train.parallel import uses_fsdp
from nextstep.train.run import Run
from nextstep.train.sequences import TrainBatch

StepFn = Callable[[Run], StepOutput]  # one optimizer step at run.step; the loop counts the steps


def image_targets(batch: TrainBatch, vae: AutoEncoder | None, patch: int) -> torch.Tensor:
    """Patchified model latents of every image, in placeholder order: (N, C*p*p). Each shape group is
    encoded in one call, on CUDA padded to a multiple of 32 images so that cuDNN sees few distinct shapes
    (each new shape costs a plan search on the host). The groups' token rows are put in placeholder order
    by one gather (none when a single group is already in order), not per image."""
    if not batch.image_groups:
        return torch.zeros(0, 1)
    ordered = len(batch.image_groups) == 1 and batch.image_groups[0][0] == list(range(len(batch.image_sample)))
    flat: list[torch.Tensor] = []
    starts: dict[int, int] = {}  # image -> its first row in the concatenated groups
    lens: dict[int, int] = {}  # image -> its token count
    row = 0
    for idx, x in batch.image_groups:
        if vae is not None:
            pad = -len(idx) % 32 if x.is_cuda else 0
            if pad:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            with torch.no_grad():
                x = vae.encode(normalize_pixels(x, next(vae.parameters()).dtype))[: len(idx)]  # (n, C, h, w)
        tokens = patchify(x.float(), patch)  # (n, h*w, C*p*p)
        n, per = tokens.shape[:2]
        flat.append(tokens.reshape(n * per, -1))
        if ordered:
            return flat[0]
        for j, i in enumerate(idx):
            starts[i], lens[i] = row + j * per, per
        row += n * per
    rows = torch.cat(flat)  # (sum of tokens, C*p*p) in group order
    count = torch.tensor([lens[i] for i in range(len(lens))])
    first = torch.tensor([starts[i] for i in range(len(starts))])
    # Row r of the output (image i, token k) is rows[first[i] + k].
    out_first = torch.cumsum(count, 0) - count
    index = torch.repeat_interleave(first - out_first, count) + torch.arange(int(count.sum()))
    return rows[index.to(rows.device)]


def forward_backward_step(run: Run, batch: TrainBatch, *, accum: int) -> torch.Tensor:
    """Forward one micro-batch (already on the device) and backpropagate its loss / `accum`; returns
    [loss, lm_loss, im_loss] of the micro-batch, detached, on the device: (3,)."""
    arch, t_cfg, device = run.cfg.model.arch, run.cfg.training, run.device
    targets = image_targets(batch, run.vae, arch.latent_patch_size).to(device)
    images = (batch.image_sample, batch.image_tokens, arch.token_dim)
    keyed = dict(key=(t_cfg.seed, run.step), device=device)
    noise, t = flow_noise(*images, arch.fm_head_batch_mul, **keyed)
    inputs = None
    if t_cfg.image_input_noise > 0:
        inputs = targets + input_noise(*images, t_cfg.image_input_noise, **keyed)
    out = run.model.forward_train(
        batch.input_ids,
        batch.labels,
        targets,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        fm_noise=noise,
        fm_t=t,
        image_inputs=inputs,
    )
    (out.loss / accum).backward()
    return torch.stack([out.loss.detach(), out.lm_loss.detach(), out.im_loss.detach()]).float()


def train_step(run: Run) -> StepOutput:
    """One optimizer step: `training.grad_accum_steps` micro-batches, gradient clipping, optimizer and
    schedule. Metrics stay on the device (no host sync)."""
    cfg, accum = run.cfg, run.cfg.training.grad_accum_steps
    losses = torch.zeros(3, device=run.device)
    tokens, flops, wait = 0, 0.0, 0.0
    for micro in range(accum):
        t_wait = time.perf_counter()
        batch = run.batches.next()
        wait += time.perf_counter() - t_wait
        # Samples are numbered across micro-batches and ranks, so the flow noise of a global batch is the
        # same however it is split.
        batch.offset_samples((micro * run.world + run.rank) * batch.num_samples)
        batch = batch.to(run.device)
        if uses_fsdp(cfg.parallel):
            run.model.set_requires_gradient_sync(micro == accum - 1)
        losses += forward_backward_step(run, batch, accum=accum) / accum
        tokens += sum(batch.seq_lens)
        flops += train_flops(
            cfg.model.arch,
            run.head_params,
            seq_lens=batch.seq_lens,
            text_targets=batch.num_text_targets,
            image_tokens=sum(batch.image_tokens),
        )
    grad_norm, lr = optimizer_step(run)
    metrics = {"loss": losses[0], "lm_loss": losses[1], "im_loss": losses[2], "grad_norm": grad_norm}
    return StepOutput(metrics, lr=lr, tokens=tokens, flops=flops, data_wait=wait)


def optimizer_step(run: Run) -> tuple[torch.Tensor, float]:
    """Clip the accumulated gradients, step the optimizer and the schedule, clear the gradients.
    Returns (global gradient norm before clipping (), on the device; the step's base learning rate)."""
    grad_norm = torch.zeros((), device=run.device)
    if run.cfg.optim.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.optim.max_grad_norm)
        grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    group = run.optimizer.param_groups[0]
    lr = group["lr"] / group["lr_mult"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
