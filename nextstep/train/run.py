"""One training run's pieces, built once from a TrainConfig (`build_run`: process group, tokenizer, model,
VAE, LoRA, trainable set, parallelism, optimizer, schedule, batches), and its checkpoint (`resume_run`,
`save_run`: model, optimizer, schedule, data position and RNG, for exact resume)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nextstep.hub import resolve_model_dir
from nextstep.model.tokenizer import TextTokenizer
from nextstep.model.vae import AutoEncoder, load_vae
from nextstep.train import checkpoint as ckpt
from nextstep.train.batches import BatchStream, build_batches
from nextstep.train.config import TrainConfig, dumps
from nextstep.train.init import init_model, resolve_arch, set_trainable
from nextstep.train.lora import apply_lora
from nextstep.train.optim import build_optimizer, build_scheduler, lr_factor
from nextstep.train.parallel import DTYPE, parallelize, setup_distributed

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training step needs; `step` counts optimizer steps taken (restored by `resume_run`)."""

    cfg: TrainConfig  # resolved: cfg.model.arch is the model's
    rank: int
    world: int
    device: torch.device
    config_json: str  # the resolved config, saved beside the run and in every checkpoint
    tokenizer: TextTokenizer
    model: nn.Module  # NextStep with LoRA / parallelism applied
    vae: AutoEncoder | None  # frozen; None with model.precomputed_latents
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: BatchStream
    trainable: list[nn.Parameter]  # the parameters the optimizer updates (gradient clipping)
    head_params: int  # parameters of the flow head (FLOP accounting)
    step: int = 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.training.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"


def build_run(cfg: TrainConfig, *, data: Iterable | None = None) -> Run:
    """Build every piece of the run in `cfg` (which gets the resolved architecture) and write the resolved
    config to training.output_dir. `data`: optional iterable of per-rank Sample lists instead of wds.py."""
    t_cfg = cfg.training
    rank, world, device = setup_distributed(cfg.parallel)
    if t_cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(t_cfg.output_dir)
    if cfg.model.path:  # a Hub id or zoo name becomes its cached checkpoint directory
        cfg.model.path = str(resolve_model_dir(cfg.model.path))
    tok_dir = cfg.model.resolved_tokenizer_dir
    tokenizer = TextTokenizer(tok_dir) if tok_dir else None
    if tokenizer is None:
        raise ValueError("model.tokenizer_dir (or model.path) must name a directory with tokenizer.json")
    arch = resolve_arch(cfg, tokenizer)
    cfg.model.arch = arch
    config_json = dumps(cfg)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(config_json)
        log.info("resolved config:\n%s", config_json)

    model = init_model(cfg, arch)
    vae = None
    if not cfg.model.precomputed_latents:
        vae_dtype = DTYPE[cfg.parallel.param_dtype] if device.type == "cuda" else torch.float32
        vae = load_vae(cfg.model.resolved_vae_dir, dtype=vae_dtype, device=device)
        vae.requires_grad_(False)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    set_trainable(model, t_cfg.train_modules)
    n_params = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in model.image_head.parameters())
    model.to(device)
    parallelize(model, cfg.parallel, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    down = arch.latent_patch_size * (vae.config.down_factor if vae is not None else 1)
    batches = build_batches(cfg, tokenizer, down_factor=down, pixels=vae is not None, rank=rank, world=world, data=data)
    log.info(
        "model: %.1fM parameters (%.1fM in the flow head), world size %d", n_params / 1e6, head_params / 1e6, world
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Run(
        cfg,
        rank,
        world,
        device,
        config_json,
        tokenizer,
        model,
        vae,
        optimizer,
        scheduler,
        batches,
        trainable,
        head_params,
    )


def resume_run(run: Run) -> None:
    """With training.resume, restore the newest checkpoint into `run`: exactly (data position and RNG too),
    or with training.elastic_resume after a change of world size or workers, the data restarting at the
    next epoch."""
    t_cfg = run.cfg.training
    if not t_cfg.resume:
        return
    last = ckpt.latest_checkpoint(run.ckpt_root)
    if last is None:
        log.info("training.resume=true but no checkpoint in %s: starting fresh", run.ckpt_root)
        return
    step, state, exact = ckpt.load(last, model=run.model, optimizer=run.optimizer, elastic=t_cfg.elastic_resume)
    run.scheduler.load_state_dict(state["scheduler"])
    # The optimizer stored the lr of the saved schedule; a resume may change it (longer max_steps).
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs, strict=True):
        group["lr"] = base * lr_factor(step, run.cfg)
    if exact:
        exact = run.batches.load_state_dict(state["data"], elastic=t_cfg.elastic_resume)
        ckpt.set_rng_state(state["rng"])
    if not exact:
        epoch = run.batches.restart_after(state["data"])
        log.warning("elastic resume: model, optimizer and schedule restored; the data restarts at epoch %s", epoch)
    run.step = step
    log.info("resumed from %s at step %d", last, step)


def save_run(run: Run) -> None:
    """Checkpoint `run` at run.step (collective under FSDP): model, optimizer, schedule, data, RNG."""
    trainer_state = {"scheduler": run.scheduler.state_dict(), "data": run.batches.state_dict(), "rng": ckpt.rng_state()}
    ckpt.save(
        run.ckpt_root,
        run.step,
        model=run.model,
        optimizer=run.optimizer,
        trainer_state=trainer_state,
        config_json=run.config_json,
        keep_last=run.cfg.checkpoint.keep_last,
    )
