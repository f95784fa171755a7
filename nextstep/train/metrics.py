"""Training metrics: FLOP accounting for MFU, device peaks, the rank-0 sinks (metrics.jsonl, optional wandb
and TensorBoard, imported only when enabled), the per-step log (`StepLog`: what a step reports, averaged
over ranks once per logging window) and sample images from the inference pipeline."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from nextstep.model.config import NextStepConfig
from nextstep.model.nextstep import NextStep
from nextstep.train.config import TrainConfig, to_dict
from nextstep.train.lora import apply_lora, merge_lora

log = logging.getLogger(__name__)

# bf16 dense tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The device's bf16 dense peak, None when unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def layer_params(cfg: NextStepConfig) -> int:
    """Matmul parameters of one decoder layer (biases and norms are negligible)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return d * q + 2 * d * kv + q * d + 3 * d * f


def train_flops(
    cfg: NextStepConfig, head_params: int, *, seq_lens: list[int], text_targets: int, image_tokens: int
) -> float:
    """Model FLOPs of one forward+backward (6 per parameter and token; recomputation not counted).

    Decoder layers see every token; causal attention adds 6 * L^2/2 * H*D * 2 per layer and document;
    lm_head runs on text targets only; the projectors on image tokens; the flow head on each image
    token `fm_head_batch_mul` times.
    """
    tokens = sum(seq_lens)
    flops = 6 * cfg.num_hidden_layers * layer_params(cfg) * tokens
    attn_width = cfg.num_attention_heads * cfg.head_dim
    flops += 6 * cfg.num_hidden_layers * attn_width * sum(n * n for n in seq_lens)
    flops += 6 * cfg.hidden_size * cfg.vocab_size * text_targets
    flops += 6 * (cfg.token_dim * cfg.hidden_size + cfg.hidden_size**2) * image_tokens
    flops += 6 * head_params * image_tokens * cfg.fm_head_batch_mul
    return float(flops)


def read_wandb_dotconfig(path: str | Path = ".config") -> dict[str, str]:
    """WANDB_* lines of the official `.config` file (KEY=VALUE), put into the environment if unset."""
    path = Path(path)
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.startswith("WANDB_"):
                found[key] = value.strip()
                os.environ.setdefault(key, value.strip())
    return found


class MetricsWriter:
    """Rank-0 sinks; every other rank gets a writer that does nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        run_name: str,
        config: dict[str, Any],
        wandb: bool = False,
        wandb_project: str = "nextstep",
        tensorboard: bool = False,
    ) -> None:
        self.enabled = enabled
        self._wandb = self._tb = None
        if not enabled:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.dir / "metrics.jsonl").open("a")
        if wandb:
            read_wandb_dotconfig()
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(
                project=wandb_project, name=run_name, config=config, dir=str(self.dir), resume="allow"
            )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def log_images(self, step: int, images: list, captions: list[str]) -> None:
        if not self.enabled:
            return
        out = self.dir / "samples"
        out.mkdir(exist_ok=True)
        for i, im in enumerate(images):
            im.save(out / f"step{step:08d}_{i}.png")
        if self._wandb is not None:
            import wandb as wandb_lib

            self._wandb.log(
                {"samples": [wandb_lib.Image(im, caption=c) for im, c in zip(images, captions, strict=True)]},
                step=step,
            )
        if self._tb is not None:
            import numpy as np

            for i, im in enumerate(images):
                self._tb.add_image(f"sample/{i}", np.asarray(im), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


@dataclass
class StepOutput:
    """What one optimizer step reports; the metric tensors stay on the device until the log reads them."""

    metrics: dict[str, torch.Tensor]  # name -> 0-dim tensor, this rank's value; the same names every step
    lr: float  # base learning rate of the step (before per-module multipliers)
    tokens: int  # sequence tokens this rank trained on
    flops: float  # model FLOPs this rank spent (train_flops)
    data_wait: float  # host seconds blocked on the loader


def _all_mean(t: torch.Tensor) -> list:
    """Mean over ranks, as Python numbers (the one host sync of a logging window)."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


class StepLog:
    """The training log: step metrics are kept on the device and read once per `logging.log_steps` window,
    averaged over ranks into `history` and written (rank 0) with throughput, MFU, peak memory and the data
    stats; a progress bar shows the steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        rank: int,
        world: int,
        device: torch.device,
        start_step: int,
        data_stats: Callable[[], dict],
    ) -> None:
        out_dir = Path(cfg.training.output_dir)
        self.writer = MetricsWriter(
            out_dir,
            enabled=rank == 0,
            run_name=cfg.logging.run_name or out_dir.name,
            config=to_dict(cfg),
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            tensorboard=cfg.logging.tensorboard,
        )
        self.every, self.last = cfg.logging.log_steps, cfg.training.max_steps
        self.world, self.device, self.data_stats = world, device, data_stats
        self.peak = peak_flops(device, cfg.logging.peak_tflops)
        self.bar = tqdm(total=self.last, initial=start_step, disable=rank != 0 or not cfg.logging.progress)
        self.history: list[dict[str, float]] = []
        self.pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, metric values) not yet read
        self.keys: list[str] = []  # metric names of the pending steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._new_window()

    def _new_window(self) -> None:
        self.start, self.tokens, self.flops, self.wait = time.perf_counter(), 0, 0.0, 0.0

    def record(self, step: int, out: StepOutput) -> None:
        """Keep step `step`'s report; at the end of a window (or of training) read and write the window."""
        self.keys = list(out.metrics)
        self.pending.append((step, out.lr, torch.stack([v.float() for v in out.metrics.values()])))
        self.tokens += out.tokens
        self.flops += out.flops
        self.wait += out.data_wait
        self.bar.update(1)
        if step % self.every == 0 or step == self.last:
            self._flush(step, out.lr)

    def _flush(self, step: int, lr: float) -> None:
        window = _all_mean(torch.stack([v for _, _, v in self.pending]))  # (steps, metrics)
        for (s, lr_s, _), values in zip(self.pending, window, strict=True):
            self.history.append({"step": s, **dict(zip(self.keys, values, strict=True)), "lr": lr_s})
        self.pending = []
        n = len(window)
        metrics = {k: sum(h[k] for h in self.history[-n:]) / n for k in self.keys}
        metrics["lr"] = lr
        elapsed = time.perf_counter() - self.start
        tokens, flops = _all_mean(torch.tensor([self.tokens, self.flops], dtype=torch.float64, device=self.device))
        metrics["tokens_per_s"] = tokens * self.world / elapsed
        metrics["steps_per_s"] = n / elapsed
        metrics["data_wait_frac"] = self.wait / elapsed  # host time blocked on the loader (rank 0)
        if self.peak:
            metrics["mfu"] = flops / elapsed / self.peak
        if self.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for k, v in self.data_stats().items():
            if isinstance(v, int):
                metrics[f"data/{k}"] = v
        self.writer.log(step, metrics)
        self.bar.set_postfix({k: f"{metrics[k]:.4f}" for k in self.keys if k != "grad_norm"})
        self._new_window()

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def sampling_copy(
    model: nn.Module, cfg: TrainConfig, dtype: torch.dtype, device: torch.device, *, every_rank: bool = False
) -> NextStep | None:
    """A plain, unsharded, adapter-merged copy of the model for the inference pipeline. Collective under
    FSDP (every rank gathers); rank 0 gets the copy (it costs one more model in `dtype`), others None, or
    with `every_rank` every rank gets one (gathered on the device: RL rollouts on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    state = get_model_state_dict(model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0 and not every_rank:
        return None
    with torch.device("meta"):
        copy = NextStep(cfg.model.arch).to(dtype)  # allocated in `dtype`: no full float32 copy beside the state
    if cfg.lora.enabled:
        apply_lora(copy, cfg.lora)
    copy.to_empty(device=device)
    copy.load_state_dict(state, strict=True)
    if cfg.lora.enabled:
        merge_lora(copy)
    return copy.to(dtype).eval()


def write_samples(cfg: TrainConfig, model, vae, tokenizer, writer: MetricsWriter, step: int, device) -> None:
    """Sample images of `logging.sample_prompts` with the inference pipeline; rank 0 saves them."""
    if vae is None:
        log.warning("sample images skipped: model.precomputed_latents=true loads no VAE to decode them")
        return
    from nextstep.sampling.pipeline import Pipeline

    lg = cfg.logging
    copy = sampling_copy(model, cfg, next(vae.parameters()).dtype, device)
    if copy is not None:
        images = Pipeline(copy, vae, tokenizer).generate(
            lg.sample_prompts,
            size=(lg.sample_size, lg.sample_size),
            steps=lg.sample_head_steps,
            cfg=lg.sample_cfg,
            seed=0,
        )
        writer.log_images(step, images, lg.sample_prompts)
        del copy
    if dist.is_initialized():
        dist.barrier()
