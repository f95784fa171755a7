"""The RL training mode's optimizer step (`training.mode=rl`, a `StepFn` of nextstep.train.loop): rollouts of the
current policy (text-to-image groups, then rl.edit_fraction of the groups as edits) -> rewards -> group advantages
(flat groups dropped) -> log-densities recomputed in one teacher-forced forward -> clipped policy loss (+ KL to the
frozen starting model) -> one optimizer step.

Strictly on-policy: each rollout batch gets one update, so the policy ratio is 1 up to numerics (the clipped form
is kept). Every random choice (prompts, trained head steps, the sampler's draws) is a pure function of
(seed, step, rank), so a resumed run reproduces the rewards of the run it continues.

    nextstep train -m configs.rl_shapes
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from nextstep.io import save_png
from nextstep.rl.objective import clipped_policy_loss, group_advantages, kl_to_reference
from nextstep.rl.policy import RolloutPolicy
from nextstep.rl.prompts import rl_edit_prompts, rl_prompts
from nextstep.rl.rewards import close_pool, resolve_reward, score_rewards
from nextstep.rl.rollout import policy_log_prob, sample_rollout
from nextstep.sampling.flow import FlowSettings
from nextstep.sampling.pipeline import read_defaults
from nextstep.shapes.prompts import source_image
from nextstep.train.config import RLConfig
from nextstep.train.init import init_model
from nextstep.train.metrics import StepOutput, train_flops
from nextstep.train.noise import key_seed
from nextstep.train.parallel import uses_fsdp
from nextstep.train.run import Run
from nextstep.train.step import optimizer_step

Prompts = list[tuple[str, dict]]  # (text, reward meta) pairs


def prompt_pool(rl: RLConfig, seed: int) -> Prompts:
    """The prompts rollouts draw from: rl_prompts' in-distribution split with its spec as meta["prompt"], or
    the lines of a file (empty meta)."""
    if rl.prompts == "shapes":
        return [(text, {"prompt": spec}) for text, spec in rl_prompts("in", n=rl.prompt_pool, seed=seed)]
    path = Path(rl.prompts.removeprefix("file:"))
    if not path.is_file():
        raise ValueError(f"rl.prompts: prompt file {str(path)!r} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"rl.prompts: prompt file {str(path)!r} holds no prompt")
    return [(line, {}) for line in lines]


def edit_pool(rl: RLConfig, seed: int) -> Prompts:
    """The edits rollouts draw from (none without rl.edit_fraction): rl_edit_prompts with the spec as
    meta["prompt"]; the source image is rendered when an edit is picked (`with_sources`)."""
    if rl.edit_fraction == 0:
        return []
    return [(text, {"prompt": spec}) for text, spec in rl_edit_prompts(rl.prompt_pool, seed=seed)]


def with_sources(picked: Prompts) -> Prompts:
    """Picked edits with meta["source"]: the input image, rendered exactly from the spec's scene as the eval
    renders it (the reward scores the edit against the objects parsed from it, as the eval does)."""
    return [(text, {**meta, "source": source_image(meta["prompt"])}) for text, meta in picked]


def pick_prompts(pool: Prompts, n: int, *, key: tuple) -> Prompts:
    """`n` prompts drawn with replacement, a pure function of `key`."""
    g = torch.Generator().manual_seed(key_seed(*key))
    return [pool[i] for i in torch.randint(len(pool), (n,), generator=g).tolist()]


def trained_steps(rl: RLConfig, seed: int, step: int) -> tuple[int, ...]:
    """The head steps trained at optimizer step `step`: rl.steps_per_rollout of rl.train_steps (all with 0),
    the same on every rank."""
    candidates = sorted(set(rl.train_steps))
    if rl.steps_per_rollout == 0:
        return tuple(candidates)
    g = torch.Generator().manual_seed(key_seed(seed, step, "trained-steps"))
    return tuple(sorted(candidates[i] for i in torch.randperm(len(candidates), generator=g)[: rl.steps_per_rollout]))


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images of one size in rows of `cols` (a group per row)."""
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, -(-len(images) // cols) * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


class RLStep:
    """One RL optimizer step of a Run; holds what lives across steps (reward, prompt pool, reference model),
    built at the first call."""

    def __init__(self) -> None:
        self.reward = None
        self.pool: Prompts = []
        self.edits: Prompts = []
        self.policy: RolloutPolicy | None = None
        self.reference: torch.nn.Module | None = None  # the starting model, frozen, for the KL term

    def setup(self, run: Run) -> None:
        cfg, rl = run.cfg, run.cfg.rl
        self.reward = resolve_reward(rl.reward, model_dir=rl.reward_model_dir or None, device=str(run.device))
        self.pool = prompt_pool(rl, cfg.training.seed)
        self.edits = edit_pool(rl, cfg.training.seed)
        defaults = read_defaults(Path(cfg.model.path)) if cfg.model.path else {}
        self.policy = RolloutPolicy(run.vae, run.tokenizer, defaults=defaults, keep_states=rl.rollout_states)
        if rl.kl_weight > 0:  # model.init's weights, before any RL step (a resumed run gets the same)
            ref = init_model(cfg, cfg.model.arch).to(run.device, next(run.vae.parameters()).dtype)
            self.reference = ref.eval().requires_grad_(False)
        if uses_fsdp(cfg.parallel):  # the teacher-forced forward enters through these, not __call__
            from torch.distributed.fsdp import register_fsdp_forward_method

            for name in ("embed", "forward_hidden", "head_condition"):
                register_fsdp_forward_method(run.model, name)

    def close(self) -> None:
        """What the run started outside this process: the reward pool's workers (the loop calls this at its end)."""
        close_pool()

    def __call__(self, run: Run) -> StepOutput:
        if self.reward is None:
            self.setup(run)
        cfg, rl, dev = run.cfg, run.cfg.rl, run.device
        seed = cfg.training.seed
        start = time.perf_counter()
        n_edit = round(rl.edit_fraction * rl.prompts_per_step)
        picked = pick_prompts(self.pool, rl.prompts_per_step - n_edit, key=(seed, run.step, run.rank, "prompts"))
        if n_edit:
            picked += with_sources(pick_prompts(self.edits, n_edit, key=(seed, run.step, run.rank, "edits")))
        texts = [text for text, _ in picked for _ in range(rl.group_size)]  # (B,) group-major
        meta = [m for _, m in picked for _ in range(rl.group_size)]
        settings = FlowSettings(
            family=cfg.model.arch.family,
            num_steps=rl.head_steps,
            shift=rl.shift,
            rule=rl.rule,
            noise_level=rl.noise_level,
            stochastic=trained_steps(rl, seed, run.step),
        )
        # Rollouts run on a plain copy of the current weights (unsharded, adapters merged): the engine fuses
        # projections and runs in inference mode, neither of which the trained model may see.
        self.policy.update(run.model, cfg, dev)
        ro, images = sample_rollout(
            self.policy.pipe,
            texts,
            settings,
            size=(rl.image_size, rl.image_size),
            seed=key_seed(seed, run.step, run.rank, "roll"),
            sources=[m.get("source") for m in meta],
            engine=self.policy.engine,
        )
        self.policy.release()
        rollout_s = time.perf_counter() - start

        rewards, skipped = score_rewards(self.reward, images, texts, meta)  # (B,) NaN where skipped
        adv, kept = group_advantages(
            rewards.view(rl.prompts_per_step, rl.group_size), high=rl.drop_above, min_std=rl.min_reward_std
        )
        log_prob, v = policy_log_prob(run.model, ro)  # (B, N, S), (B, N, S, D)
        # One ratio per token and trained step, as GRPO per text token: bounded for any image length.
        loss, clip_frac = clipped_policy_loss(
            log_prob, ro.log_prob, adv.flatten().to(dev), kept.flatten().to(dev), clip=rl.clip
        )
        kl = torch.zeros((), device=dev)
        if self.reference is not None:
            with torch.no_grad():
                _, v_ref = policy_log_prob(self.reference, ro)
            kl = kl_to_reference(ro.record.x, v, v_ref, ro.coef).mean()
            loss = loss + rl.kl_weight * kl
        loss.backward()
        # Parameters the rollouts never reach (lm_head: no text is predicted) get zero gradients, so AdamW keeps a
        # state for every parameter and the checkpoint's optimizer state has the keys a resume loads.
        for p in run.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm, lr = optimizer_step(run)

        sample_steps = cfg.logging.sample_steps
        if run.rank == 0 and sample_steps and (run.step + 1) % sample_steps == 0:
            save_png(image_grid(images, rl.group_size), run.out_dir / "samples" / f"rollout_step{run.step + 1:08d}.png")
        finite = rewards[torch.isfinite(rewards)]
        b, n, s = ro.log_prob.shape
        groups = kept.any(1)
        metrics = {
            "loss": loss.detach(),
            "reward_mean": finite.mean() if finite.numel() else torch.tensor(float("nan")),
            "reward_std": finite.std(unbiased=False) if finite.numel() else torch.tensor(float("nan")),
            "kept_groups": groups.sum().float(),
            "skipped_samples": torch.tensor(float(skipped)),
            "kl": kl.detach(),
            "clip_frac": clip_frac,
            "ratio_dev": (log_prob.detach() - ro.log_prob).abs().max(),  # |log ratio| at the update: numerics only
            "grad_norm": grad_norm,
            "rollout_s": torch.tensor(rollout_s),
            "update_s": torch.tensor(time.perf_counter() - start - rollout_s),
        }
        if n_edit:  # the edit groups come last
            metrics["edit_reward_mean"] = rewards[(rl.prompts_per_step - n_edit) * rl.group_size :].nanmean()
        metrics = {k: v.to(dev).float() for k, v in metrics.items()}
        seq = ro.input_ids.shape[1] + n
        flops = train_flops(cfg.model.arch, 0, seq_lens=[seq] * b, text_targets=0, image_tokens=0)
        flops += 6.0 * run.head_params * b * n * s  # the head at every trained state; rollouts not counted
        return StepOutput(metrics, lr=lr, tokens=b * n, flops=flops, data_wait=0.0)
