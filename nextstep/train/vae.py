r"""Train a NextStep-format VAE for a new image domain: L1/L2 + multi-scale gradient/SSIM + small KL losses,
Gaussian noise on the latents before decoding (SPEC §4), shift/scale calibrated from data, exact resume.

    python -m nextstep.train.vae --data DIR --out runs/vae --steps 20000 --batch 32 --size 128 \
        --ch 64 --ch-mult 1,2,2,4
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from nextstep.args import ArgumentParser
from nextstep.io import torch_save
from nextstep.model.vae import AutoEncoder, VAEConfig, pil_to_pixels, save_vae

log = logging.getLogger(__name__)
STATE_NAME = "train_state.pt"
TRAIN_CONFIG_NAME = "train_config.json"


@dataclass(frozen=True)
class VAETrainConfig:
    """Every hyper-parameter of a VAE run; the model fields become the saved `VAEConfig`."""

    size: int = 128  # training image side in pixels
    ch: int = 64  # VAE base width
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # width per level; 4 levels = 8x downsampling
    num_res_blocks: int = 2  # ResnetBlocks per encoder level
    z_channels: int = 16  # latent channels, NextStep's 16
    psz: int = 2  # encoder-norm patch size (= NextStep latent patch size)
    encoder_norm: bool = True  # parameter-free LayerNorm of each latent patch, as NextStep's VAE
    deterministic: bool = True  # decode the posterior mean (latent noise below regularises instead)
    steps: int = 20000  # optimizer steps
    batch: int = 32  # images per step
    lr: float = 2e-4  # AdamW peak learning rate
    warmup_steps: int = 500  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm
    l1_weight: float = 1.0  # per-pixel L1 on [-1, 1] images
    l2_weight: float = 1.0  # per-pixel MSE on [-1, 1] images
    structure_weight: float = 0.5  # multi-scale gradient-L1 + (1 - SSIM): weight-free stand-in for LPIPS
    structure_scales: int = 3  # number of 2x average-pool scales in the structure loss
    kl_weight: float = 1e-4  # KL(posterior || N(0, 1)), mean per latent element
    latent_noise: float = 0.2  # max std of Gaussian noise on latents before decoding, U(0, max) per image
    calib_images: int = 256  # images used to calibrate shift/scale and report eval PSNR at each save
    save_every: int = 1000  # steps between checkpoints (the last step is always saved)
    log_every: int = 50  # steps between log lines
    workers: int = 4  # data-loader processes (folder / shard input)
    seed: int = 0  # seeds init, batch sampling and latent noise

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        multiple = 2 ** (len(self.ch_mult) - 1) * self.psz
        if self.size % multiple:
            raise ValueError(f"size {self.size} must be a multiple of downsampling * psz = {multiple}")
        for name in ("steps", "batch", "save_every", "log_every", "calib_images", "structure_scales"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.vae_config()  # validates the model fields

    def vae_config(self) -> VAEConfig:
        return VAEConfig(
            resolution=self.size,
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            deterministic=self.deterministic,
            encoder_norm=self.encoder_norm,
            psz=self.psz,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ch_mult": list(self.ch_mult)}


@dataclass
class VAETrainResult:
    start_step: int  # step the run started from (> 0 after resume)
    step: int  # step reached
    mse_history: list[float]  # per-step reconstruction MSE of this run (noisy latents, [-1, 1] pixels)
    eval_psnr: float  # dB, clean reconstruction of the calibration images at the last save
    shift_factor: float
    scaling_factor: float


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1] (B, 3, H, W); peak-to-peak range 2."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM with a uniform window (as in monodepth) of images in [-1, 1]."""
    a, b = a / 2 + 0.5, b / 2 + 0.5
    c1, c2 = 0.01**2, 0.03**2

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    mu_a, mu_b = pool(a), pool(b)
    var_a, var_b, cov = pool(a * a) - mu_a**2, pool(b * b) - mu_b**2, pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def structure_loss(recon: torch.Tensor, target: torch.Tensor, scales: int) -> torch.Tensor:
    """Gradient-L1 + (1 - SSIM) averaged over `scales` 2x-pooled scales; needs no pretrained weights."""
    total = recon.new_zeros(())
    for s in range(scales):
        if s:
            recon, target = F.avg_pool2d(recon, 2), F.avg_pool2d(target, 2)
        d = recon - target
        grad = (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()
        total = total + grad + (1 - ssim(recon, target))
    return total / scales


def vae_losses(
    model: AutoEncoder, pixels: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Loss terms and PSNR for one batch of [-1, 1] pixels (B, 3, H, W); "loss" is the weighted sum."""
    mean, logvar = model.encode_moments(pixels)  # (B, C, h, w) each
    z = model.sample_latents(mean, logvar, generator=generator)
    # Noise of a random size per image on the raw latents: with encoder_norm each patch is unit-variance, so
    # this is noise on (nearly) the normalised latents the LM predicts, and the decoder learns to absorb it.
    sigma = torch.rand(z.shape[0], 1, 1, 1, generator=generator, device=z.device) * cfg.latent_noise
    z = z + sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    recon = model.decode_raw(z).float()
    mean, logvar = mean.float(), logvar.float()
    terms = {
        "l1": (recon - pixels).abs().mean(),
        "mse": (recon - pixels).pow(2).mean(),
        "structure": structure_loss(recon, pixels, cfg.structure_scales),
        "kl": 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean(),
        "psnr": psnr(recon.detach(), pixels),  # reported only
    }
    terms["loss"] = (
        cfg.l1_weight * terms["l1"]
        + cfg.l2_weight * terms["mse"]
        + cfg.structure_weight * terms["structure"]
        + cfg.kl_weight * terms["kl"]
    )
    return terms


def lr_at(step: int, cfg: VAETrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: AutoEncoder, images: torch.Tensor, batch: int) -> tuple[float, float, float]:
    """Clean reconstruction PSNR and the raw-latent mean/std over `images` (N, 3, H, W) in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    zs, psnrs = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = model.encode_raw(x)
            recon = model.decode_raw(z)
        zs.append(z.float())
        psnrs.append(psnr(recon, x) * len(x))
    model.train()
    z = torch.cat(zs)  # (N, C, h, w)
    return (torch.stack(psnrs).sum() / len(images)).item(), z.mean().item(), z.std().item()


def _load_image(source: str | Path | io.BytesIO, size: int) -> torch.Tensor:
    """Decode, center-crop to a square, resize to size x size -> (3, size, size) in [-1, 1]."""
    img = Image.open(source).convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return pil_to_pixels(img)[0]


class PngFolder(Dataset):
    def __init__(self, files: Sequence[Path], size: int) -> None:
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _load_image(self.files[i], self.size)


class PngShards(IterableDataset):
    """Endless stream of the `*.png` members of WebDataset tar shards; shards split across workers."""

    def __init__(self, shards: Sequence[Path], size: int, *, seed: int, buffer: int = 256) -> None:
        self.shards, self.size, self.seed, self.buffer = list(shards), size, seed, buffer

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.shards[wid::nworkers]
        if not shards:
            return
        rng = random.Random(self.seed * 1000 + wid)
        pool: list[torch.Tensor] = []  # shuffle buffer: shards hold consecutive, often similar, samples
        while True:
            rng.shuffle(shards)
            for shard in shards:
                with tarfile.open(shard, "r|*") as tar:
                    for member in tar:
                        if member.isfile() and member.name.endswith(".png"):
                            pool.append(_load_image(io.BytesIO(tar.extractfile(member).read()), self.size))
                            if len(pool) >= self.buffer:
                                yield pool.pop(rng.randrange(len(pool)))


def image_batches(
    data_dir: str | Path, size: int, batch: int, *, workers: int = 4, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Endless (batch, 3, size, size) batches in [-1, 1] from a folder of PNGs or of *.tar shards."""
    data_dir = Path(data_dir)
    shards, pngs = sorted(data_dir.glob("*.tar")), sorted(data_dir.rglob("*.png"))
    common = dict(batch_size=batch, num_workers=workers, drop_last=True, pin_memory=torch.cuda.is_available())
    if shards:
        loader = DataLoader(PngShards(shards, size, seed=seed), **common)
    elif len(pngs) >= batch:
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(PngFolder(pngs, size), shuffle=True, generator=gen, **common)
    else:
        raise ValueError(f"{data_dir} holds no *.tar shards and fewer than {batch} *.png files")
    while True:
        yield from loader


def train_vae(
    data: torch.Tensor | Iterator[torch.Tensor],
    cfg: VAETrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> VAETrainResult:
    """Train from `data`: a tensor (N, 3, H, W) in [-1, 1] sampled with replacement (exactly resumable), or an
    endless iterator of such batches. Writes `out_dir/{config.json,checkpoint.pt}` (the VAE, loadable by
    `load_vae`), `train_state.pt` (for `resume`) and `train_config.json`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = AutoEncoder(cfg.vae_config()).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    if isinstance(data, torch.Tensor):
        eval_images = data[: cfg.calib_images]

        def next_batch() -> torch.Tensor:
            return data[torch.randint(len(data), (cfg.batch,), generator=data_gen)]
    else:
        eval_images = torch.cat([next(data) for _ in range(math.ceil(cfg.calib_images / cfg.batch))])

        def next_batch() -> torch.Tensor:
            return next(data)

    start = 0
    if resume:
        if not (out_dir / STATE_NAME).is_file():
            raise FileNotFoundError(f"--resume: {out_dir / STATE_NAME} does not exist")
        state = torch.load(out_dir / STATE_NAME, map_location="cpu", weights_only=True)
        if state["train_config"] != cfg.to_dict():
            log.warning("resuming with a changed config: %s -> %s", state["train_config"], cfg.to_dict())
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_gen"])
        noise_gen.set_state(state["noise_gen"])
        start = state["step"]
        log.info("resumed %s at step %d", out_dir, start)
    (out_dir / TRAIN_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    mse_history: list[torch.Tensor] = []
    eval_psnr = float("nan")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="vae")
    for step in bar:
        pixels = next_batch().to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            terms = vae_losses(model, pixels, cfg, noise_gen)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        mse_history.append(terms["mse"].detach())
        if (step + 1) % cfg.log_every == 0:
            shown = {k: f"{v.item():.4g}" for k, v in terms.items()}
            bar.set_postfix(shown)
            log.info("step %d %s", step + 1, shown)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            eval_psnr = _save(model, opt, data_gen, noise_gen, cfg, out_dir, step + 1, eval_images)
    return VAETrainResult(
        start_step=start,
        step=max(start, cfg.steps),
        mse_history=torch.stack(mse_history).tolist() if mse_history else [],
        eval_psnr=eval_psnr,
        shift_factor=model.config.shift_factor,
        scaling_factor=model.config.scaling_factor,
    )


def _save(
    model: AutoEncoder,
    opt: torch.optim.Optimizer,
    data_gen: torch.Generator,
    noise_gen: torch.Generator,
    cfg: VAETrainConfig,
    out_dir: Path,
    step: int,
    eval_images: torch.Tensor,
) -> float:
    """Calibrate shift/scale so model latents are zero-mean unit-std; write the VAE and the train state."""
    eval_psnr, mean, std = evaluate(model, eval_images, cfg.batch)
    model.config = dataclasses.replace(model.config, shift_factor=mean, scaling_factor=1.0 / std)
    save_vae(model, out_dir)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "data_gen": data_gen.get_state(),
        "noise_gen": noise_gen.get_state(),
        "train_config": cfg.to_dict(),
    }
    torch_save(state, out_dir / STATE_NAME)
    log.info(
        "step %d: saved %s, eval psnr %.2f dB, shift %.4f, scale %.4f",
        step,
        out_dir,
        eval_psnr,
        mean,
        1 / std,
    )
    return eval_psnr


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m nextstep.train.vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder of *.png files or of *.tar shards")
    p.add_argument("--out", required=True, type=Path, help="output folder (VAE + train state)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--device", default=None, help="default: cuda if available")
    for f in dataclasses.fields(VAETrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=default)
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"default {default}")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = VAETrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VAETrainConfig)})
    batches = image_batches(args.data, cfg.size, cfg.batch, workers=cfg.workers, seed=cfg.seed)
    result = train_vae(batches, cfg, args.out, resume=args.resume, device=args.device)
    log.info(
        "done at step %d: eval psnr %.2f dB, shift_factor %.4f, scaling_factor %.4f",
        result.step,
        result.eval_psnr,
        result.shift_factor,
        result.scaling_factor,
    )


if __name__ == "__main__":
    main()
