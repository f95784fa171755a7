"""The training loop: one plain process or one process per GPU under torchrun (FSDP2).

nextstep train -m configs.shapes training.max_steps=1000 training.save_steps=200 data.num_workers=2
torchrun --nproc_per_node=8 -m configs.nextstep_qwen14b_512px training.resume=true
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from nextstep.data.buckets import normalize_pixels
from nextstep.hub import resolve_model_dir
from nextstep.io import write_text
from nextstep.model.checkpoint import build_model, from_pretrained, load_state_dict, weight_files
from nextstep.model.config import NextStepConfig
from nextstep.model.nextstep import NextStep, patchify
from nextstep.model.tokenizer import BOI, EOI, IMAGE_PLACEHOLDER, PAD, TextTokenizer
from nextstep.model.vae import AutoEncoder, load_vae
from nextstep.train import checkpoint as ckpt
from nextstep.train.config import TrainConfig, dumps, resolve, to_dict
from nextstep.train.lora import apply_lora
from nextstep.train.metrics import MetricsWriter, peak_flops, train_flops, write_samples
from nextstep.train.noise import flow_noise, input_noise
from nextstep.train.parallel import DTYPE, init_single_process_group, parallelize, uses_fsdp
from nextstep.train.tokenize import SequenceBuilder, TrainBatch, collate, special_ids

log = logging.getLogger(__name__)


# ---- setup ---------------------------------------------------------------------------------------


def setup_distributed(backend: str = "") -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group when launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world, device


def resolve_arch(cfg: TrainConfig, tokenizer: TextTokenizer | None) -> NextStepConfig:
    """The model hyper-parameters: config.json for pretrained inits, else `model.arch` with the
    vocabulary size and special-token ids taken from the tokenizer."""
    m = cfg.model
    if m.init == "pretrained":
        from nextstep.model.config import load_config

        return load_config(Path(m.path) / "config.json")
    arch = m.arch
    if tokenizer is not None and m.vocab_multiple:
        arch.vocab_size = -(-len(tokenizer) // m.vocab_multiple) * m.vocab_multiple
        arch.boi, arch.eoi = tokenizer.token_id(BOI), tokenizer.token_id(EOI)
        arch.image_placeholder_id = tokenizer.token_id(IMAGE_PLACEHOLDER)
        arch.pad_token_id_added = tokenizer.token_id(PAD)
    return arch


def load_lm_backbone(model: NextStep, path: str | Path) -> None:
    """Backbone weights from a Qwen2-style HF LM directory (`model.`-prefixed names); image modules
    keep their fresh init. A smaller LM vocabulary fills the first rows of the embeddings."""
    state = load_state_dict(Path(path), torch.float32, "cpu")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "lm_head.weight" not in state:  # tied LMs store only the embeddings
        state["lm_head.weight"] = state["embed_tokens.weight"]
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(("image_", "gen_pos_embed"))]
    with torch.no_grad():
        for name in backbone:
            if name not in state:
                raise ValueError(f"LM checkpoint {path} is missing parameter {name!r}")
            src, dst = state[name], own[name]
            vocab_rows = name in ("embed_tokens.weight", "lm_head.weight") and src.shape[1:] == dst.shape[1:]
            if vocab_rows and src.shape[0] <= dst.shape[0]:
                dst[: src.shape[0]].copy_(src)
            elif src.shape != dst.shape:
                raise ValueError(
                    f"LM parameter {name!r} has shape {tuple(src.shape)}, model.arch implies {tuple(dst.shape)}"
                )
            else:
                dst.copy_(src)
    log.info("initialised the backbone from LM %s (%d files)", path, len(weight_files(Path(path))))


def init_model(cfg: TrainConfig, arch: NextStepConfig) -> NextStep:
    if cfg.model.init == "pretrained":
        model = from_pretrained(cfg.model.path)
        model.train()
        return model
    model = build_model(arch, seed=cfg.training.seed)
    if cfg.model.init == "lm":
        load_lm_backbone(model, cfg.model.path)
    return model


def set_trainable(model: nn.Module, prefixes: list[str]) -> None:
    """Freeze everything outside `prefixes` ([] keeps all trainable)."""
    if not prefixes:
        return
    params = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(n == p or n.startswith(p + ".") for n in params):
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"training.train_modules entry {p!r} names no module or parameter (top level: {top})")
    for name, p in model.named_parameters():
        p.requires_grad = any(name == m or name.startswith(m + ".") for m in prefixes)


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


# ---- one step ------------------------------------------------------------------------------------


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


# ---- data ----------------------------------------------------------------------------------------


class BatchStream:
    """Collated TrainBatches for this rank, from wds.py (tokenized and collated in the loader workers) or
    from a given iterable of Sample lists; `state_dict` is the loader position after the last batch taken."""

    def __init__(self, cfg: TrainConfig, builder: SequenceBuilder, collate_fn, rank: int, world: int, data=None):
        self.builder, self.collate_fn = builder, collate_fn
        self.loader = None
        if data is None:
            from nextstep.data.wds import build_dataloader

            self.loader = build_dataloader(
                cfg.data, rank=rank, world_size=world, tokenizer_fn=builder, collate=collate_fn
            )
            self.source: Iterable = self.loader
        else:
            self.source = data
        self._it: Iterator | None = None

    def next(self) -> TrainBatch:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.source)
            try:
                batch = next(self._it)
                break
            except StopIteration:  # one-pass loaders start their next epoch
                self._it = None
        else:
            raise RuntimeError("the data source yielded no batches")
        if not isinstance(batch, TrainBatch):
            batch = self.collate_fn([self.builder(s) for s in batch])
        return batch

    def state_dict(self) -> dict | None:
        return self.loader.state_dict() if self.loader is not None else None

    def load_state_dict(self, state: dict | None, *, elastic: bool = False) -> bool:
        """Restore the loader position; False when it was saved with another worker layout and `elastic`
        lets the caller restart the data instead (`restart_after`)."""
        if self.loader is not None and state is not None:
            try:
                self.loader.load_state_dict(state)
            except ValueError as e:
                if not elastic:
                    raise ValueError(f"{e} (training.elastic_resume=true restarts the data at the next epoch)") from e
                return False
            self._it = None
        return True

    def restart_after(self, state: dict | None) -> int | None:
        """Elastic resume: the loader starts the epoch after the one `state` reached (None: no loader)."""
        if self.loader is None or state is None:
            return None
        self._it = None
        return self.loader.restart_after(state)

    def stats(self) -> dict:
        return self.loader.stats() if self.loader is not None else {}


# ---- stopping ------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, save a checkpoint and stop; a second signal
    interrupts at once. Ranks agree on the stop step (an all-reduce every `every` steps), since saving
    is collective."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint after this step, then stopping (send again to abort)", signum)

    def agreed(self, step: int, *, every: int, device: torch.device) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        if step % every:
            return False
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ---- profiling -----------------------------------------------------------------------------------


class StepProfiler:
    """torch.profiler over training steps [start, start + steps): writes a Chrome trace and the top
    operators by self time to `out_dir`, and logs the table. `steps=0` does nothing."""

    def __init__(self, out_dir: Path, *, start: int, steps: int, enabled: bool) -> None:
        self.out_dir, self.start, self.stop = out_dir, start, start + steps
        self.active = enabled and steps > 0
        self.prof: torch.profiler.profile | None = None

    def step(self, step: int) -> None:
        """Call after each finished step with the new step count."""
        if not self.active:
            return
        if step == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        elif step == self.stop:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        averages = self.prof.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=25)]
        if torch.cuda.is_available():
            tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=25))
        table = "\n".join(tables)
        write_text(self.out_dir / "ops.txt", table)
        log.info("profile of steps %d-%d (%s):\n%s", self.start, self.stop, self.out_dir, table)
        self.prof, self.active = None, False


# ---- the loop ------------------------------------------------------------------------------------


def _all_mean_rows(t: torch.Tensor) -> list[list[float]]:
    """Mean over ranks of a (steps, k) tensor, as Python lists."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train(cfg: TrainConfig, *, data: Iterable | None = None) -> list[dict[str, float]]:
    """Run (or resume) training; returns this run's per-step metrics (rank 0 logs them too).
    `data`: optional iterable of per-rank Sample lists instead of the wds.py loader."""
    t_cfg = cfg.training
    rank, world, device = setup_distributed(cfg.parallel.backend)
    if world > 1 and not cfg.parallel.fsdp:
        raise ValueError("parallel.fsdp=false with more than one process: only FSDP2 is supported")
    if cfg.parallel.param_dtype != "float32" and cfg.parallel.fsdp:
        init_single_process_group(device)  # mixed precision comes from FSDP2, also in one process
    elif cfg.parallel.param_dtype != "float32":
        raise ValueError(f"parallel.param_dtype={cfg.parallel.param_dtype} needs parallel.fsdp=true")
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
    patch = arch.latent_patch_size
    if not cfg.model.precomputed_latents:
        vae_dtype = DTYPE[cfg.parallel.param_dtype] if device.type == "cuda" else torch.float32
        vae = load_vae(cfg.model.resolved_vae_dir, dtype=vae_dtype, device=device)
        vae.requires_grad_(False)
    down = patch * (vae.config.down_factor if vae is not None else 1)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    set_trainable(model, t_cfg.train_modules)
    n_params = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in model.image_head.parameters())
    model.to(device)
    parallelize(model, cfg.parallel, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    ids = special_ids(tokenizer, arch.boi, arch.eoi, arch.image_placeholder_id, arch.pad_token_id_added)
    builder = SequenceBuilder(
        tokenizer,
        ids,
        down_factor=down,
        max_len=t_cfg.max_seq_len,
        add_eos=t_cfg.add_eos,
        channels=arch.latent_channels if vae is None else 3,
    )
    collate_fn = functools.partial(
        collate, ids=ids, max_len=t_cfg.max_seq_len, pack=t_cfg.pack, pad_to_multiple=t_cfg.pad_to_multiple
    )
    stream = BatchStream(cfg, builder, collate_fn, rank, world, data)

    step = 0
    ckpt_root = out_dir / "checkpoints"
    if t_cfg.resume and (last := ckpt.latest_checkpoint(ckpt_root)) is not None:
        step, state, exact = ckpt.load(last, model=model, optimizer=optimizer, elastic=t_cfg.elastic_resume)
        scheduler.load_state_dict(state["scheduler"])
        # The optimizer stored the lr of the saved schedule; a resume may change it (longer max_steps).
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_factor(step, cfg)
        if exact:
            exact = stream.load_state_dict(state["data"], elastic=t_cfg.elastic_resume)
            ckpt.set_rng_state(state["rng"])
        if not exact:
            epoch = stream.restart_after(state["data"])
            log.warning("elastic resume: model, optimizer and schedule restored; the data restarts at epoch %s", epoch)
        log.info("resumed from %s at step %d", last, step)
    elif t_cfg.resume:
        log.info("training.resume=true but no checkpoint in %s: starting fresh", ckpt_root)

    writer = MetricsWriter(
        out_dir,
        enabled=rank == 0,
        run_name=cfg.logging.run_name or out_dir.name,
        config=to_dict(cfg),
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        tensorboard=cfg.logging.tensorboard,
    )
    peak = peak_flops(device, cfg.logging.peak_tflops)
    log.info(
        "model: %.1fM parameters (%.1fM in the flow head), world size %d",
        n_params / 1e6,
        head_params / 1e6,
        world,
    )
    bar = tqdm(total=t_cfg.max_steps, initial=step, disable=rank != 0 or not cfg.logging.progress)
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, float]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    window_start, window_tokens, window_flops, window_wait = time.perf_counter(), 0, 0.0, 0.0
    profiler = StepProfiler(out_dir / "profile", start=step + 5, steps=cfg.logging.profile_steps, enabled=rank == 0)
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, [loss, lm, im, grad norm]) not yet read
    model.train()
    stop = StopRequest()
    try:
        while step < t_cfg.max_steps:
            values = torch.zeros(4, device=device)
            for micro in range(t_cfg.grad_accum_steps):
                # Samples are numbered across micro-batches and ranks, so the flow noise of a global batch
                # is the same however it is split.
                t_wait = time.perf_counter()
                batch = stream.next()
                window_wait += time.perf_counter() - t_wait
                batch.offset_samples((micro * world + rank) * batch.num_samples)
                batch = batch.to(device)
                targets = image_targets(batch, vae, patch).to(device)
                images = (batch.image_sample, batch.image_tokens, arch.token_dim)
                keyed = dict(key=(t_cfg.seed, step), device=device)
                noise, t = flow_noise(*images, arch.fm_head_batch_mul, **keyed)
                inputs = None
                if t_cfg.image_input_noise > 0:
                    inputs = targets + input_noise(*images, t_cfg.image_input_noise, **keyed)
                last_micro = micro == t_cfg.grad_accum_steps - 1
                if uses_fsdp(cfg.parallel):
                    model.set_requires_gradient_sync(last_micro)
                out = model.forward_train(
                    batch.input_ids,
                    batch.labels,
                    targets,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    fm_noise=noise,
                    fm_t=t,
                    image_inputs=inputs,
                )
                (out.loss / t_cfg.grad_accum_steps).backward()
                parts = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.im_loss.detach()]).float()
                values[:3] += parts / t_cfg.grad_accum_steps
                window_tokens += sum(batch.seq_lens)
                window_flops += train_flops(
                    arch,
                    head_params,
                    seq_lens=batch.seq_lens,
                    text_targets=batch.num_text_targets,
                    image_tokens=sum(batch.image_tokens),
                )
            if cfg.optim.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                values[3] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            profiler.step(step)
            bar.update(1)
            pending.append((step, lr, values))
            if step % cfg.logging.log_steps == 0 or step == t_cfg.max_steps:
                # One host sync per logging window, not per step.
                window = _all_mean_rows(torch.stack([v for _, _, v in pending]))
                for (s, lr_s, _), (loss, lm_loss, im_loss, grad_norm) in zip(pending, window, strict=True):
                    history.append(
                        {
                            "step": s,
                            "loss": loss,
                            "lm_loss": lm_loss,
                            "im_loss": im_loss,
                            "grad_norm": grad_norm,
                            "lr": lr_s,
                        }
                    )
                pending = []
                n = len(window)
                metrics = {k: sum(h[k] for h in history[-n:]) / n for k in ("loss", "lm_loss", "im_loss", "grad_norm")}
                metrics["lr"] = lr
                elapsed = time.perf_counter() - window_start
                tokens, flops = _all_mean([window_tokens, window_flops], device)
                metrics["tokens_per_s"] = tokens * world / elapsed
                metrics["steps_per_s"] = n / elapsed
                metrics["data_wait_frac"] = window_wait / elapsed  # host time blocked on the loader (rank 0)
                if peak:
                    metrics["mfu"] = flops / elapsed / peak
                if device.type == "cuda":
                    metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                for k, v in stream.stats().items():
                    if isinstance(v, int):
                        metrics[f"data/{k}"] = v
                writer.log(step, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", lm=f"{metrics['lm_loss']:.3f}", im=f"{metrics['im_loss']:.4f}"
                )
                window_start, window_tokens, window_flops, window_wait = time.perf_counter(), 0, 0.0, 0.0
            if cfg.logging.sample_steps and step % cfg.logging.sample_steps == 0:
                write_samples(cfg, model, vae, tokenizer, writer, step, device)
            stopping = stop.agreed(step, every=cfg.logging.log_steps, device=device)
            if (t_cfg.save_steps and step % t_cfg.save_steps == 0) or step == t_cfg.max_steps or stopping:
                trainer_state = {
                    "scheduler": scheduler.state_dict(),
                    "data": stream.state_dict(),
                    "rng": ckpt.rng_state(),
                }
                ckpt.save(
                    ckpt_root,
                    step,
                    model=model,
                    optimizer=optimizer,
                    trainer_state=trainer_state,
                    config_json=config_json,
                    keep_last=cfg.checkpoint.keep_last,
                )
            if stopping:
                log.warning("stopped by signal at step %d; continue with --resume", step)
                break
    finally:
        stop.close()
    profiler.close()
    bar.close()
    writer.close()
    if cfg.checkpoint.export_final and rank == 0:
        from nextstep.train.export import export

        export(ckpt.latest_checkpoint(ckpt_root), out_dir / "final")
    return history


def main(argv: list[str] | None = None, *, base: TrainConfig | None = None) -> int:
    """`nextstep train -m configs.NAME [--resume] key=value ...`; presets run this as their __main__."""
    parser = argparse.ArgumentParser(prog="nextstep train", description="train NextStep")
    parser.add_argument("-m", "--module", "--config", dest="preset", help="preset, e.g. configs.shapes")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=1000")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = args.overrides + (["training.resume=true"] if args.resume else [])
    try:
        if base is not None:
            from nextstep.train.config import apply_overrides

            cfg = apply_overrides(base, overrides)
        elif args.preset:
            cfg = resolve(args.preset, overrides)
        else:
            parser.error("give a preset with -m configs.NAME")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
