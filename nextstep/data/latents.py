"""Precompute VAE latents of image shards: the same samples with each image stored as its model latents
(`key-<i>.npy`, float16 (C, H/8, W/8)), so training reads a few KB per image and runs no VAE encoder.

    nextstep data encode-latents data/shapes data/shapes-latents --vae runs/shapes/vae --size 128
    (then train with model.precomputed_latents=true on the new shards)

Images are fitted into the resolution buckets first, as the training loader would (center crop, resize):
give the run's data.image_size and data.aspect_ratios (the defaults are DataConfig's).
Output shard k is `latents-{k:06d}.tar` for the k-th source shard in sorted order, written atomically;
a rerun skips shards already written, so an interrupted run resumes. OUT/latents.json records the VAE.
A bad sample is left out of its shard, an unreadable tar out of the output; each is logged by shard and key,
and the command then exits with status 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from nextstep.args import ArgumentParser
from nextstep.data.buckets import make_buckets, nearest_bucket, normalize_pixels, resize_center_crop
from nextstep.data.config import DataConfig
from nextstep.data.format import Sample, ShardWriter, decode_sample, iter_raw_samples
from nextstep.io import write_json
from nextstep.model.vae import AutoEncoder, load_vae

log = logging.getLogger(__name__)

INFO_NAME = "latents.json"


@dataclass
class _Shard:
    """A source shard decoded by a worker: samples without images, and the images stacked per shape."""

    samples: list[Sample]
    counts: list[int]  # images per sample
    # (image numbers in sample order, uint8 (n, H, W, 3)): tensors cross to the main process in shared memory
    groups: list[tuple[list[int], torch.Tensor]]
    skipped: list[str]  # one line per sample left out ("shard: sample 'k': why")


class _ShardImages(Dataset):
    """Item k: source shard k with its images fitted to the buckets, or an error message when the tar cannot
    be read (a truncated shard is reported, not fatal). A bad sample is left out of its shard and listed."""

    def __init__(self, shards: list[Path], buckets: list[tuple[int, int]]) -> None:
        self.shards, self.buckets = shards, buckets

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> _Shard | str:
        samples, counts, by_shape, skipped, n = [], [], {}, [], 0
        try:
            with open(self.shards[k], "rb") as f:
                for raw in iter_raw_samples(f):
                    try:
                        sample = decode_sample(raw)
                        if any(not isinstance(im, Image.Image) for im in sample.images):
                            raise ValueError(f"sample {sample.key!r} already holds latents")
                    except ValueError as e:
                        skipped.append(f"{self.shards[k]}: {e}")
                        continue
                    for im in sample.images:
                        pixels = np.asarray(resize_center_crop(im, nearest_bucket(*im.size, self.buckets)))
                        by_shape.setdefault(pixels.shape, []).append((n, pixels))
                        n += 1
                    counts.append(len(sample.images))
                    sample.images = []
                    samples.append(sample)
        except Exception as e:  # truncated or corrupt tar: the shard is left out, a rerun tries it again
            return f"{self.shards[k]}: {type(e).__name__}: {e}"
        groups = [([i for i, _ in g], torch.from_numpy(np.stack([x for _, x in g]))) for g in by_shape.values()]
        return _Shard(samples, counts, groups, skipped)


@dataclass
class EncodeReport:
    paths: list[Path]  # latent shards in OUT, written by this run or an earlier one
    skipped: list[str]  # one line per shard (unreadable tar) or sample (bad member) this run left out


@torch.no_grad()
def encode_pixels(vae: AutoEncoder, groups: list[tuple[list[int], torch.Tensor]], batch: int) -> list[torch.Tensor]:
    """Model latents (C, h, w) of images given as (image numbers, uint8 (n, H, W, 3)) groups, in image
    number order. On CUDA every chunk is padded to `batch` images, so cuDNN plans one convolution shape per
    image size instead of searching again for each shard's odd remainder."""
    p = next(vae.parameters())
    out: dict[int, torch.Tensor] = {}
    for idx, images in groups:
        for s in range(0, len(idx), batch):
            chunk = images[s : s + batch]
            rows = batch if p.is_cuda else len(chunk)
            x = torch.zeros((rows, *chunk.shape[1:]), dtype=torch.uint8, device=p.device)  # (rows, H, W, 3)
            x[: len(chunk)] = chunk.to(p.device, non_blocking=True)
            x = normalize_pixels(x.permute(0, 3, 1, 2), p.dtype)  # (rows, 3, H, W) in [-1, 1]
            z = vae.encode(x)[: len(chunk)].to("cpu", torch.float16)  # (n, C, h, w)
            out.update(zip(idx[s : s + batch], z, strict=True))
    return [out[i] for i in range(len(out))]


def _write(path_dir: Path, k: int, shard: _Shard, latents: list[torch.Tensor]) -> None:
    pos = 0
    with ShardWriter(path_dir, prefix="latents", max_count=len(shard.samples) + 1, start_index=k) as writer:
        for sample, n in zip(shard.samples, shard.counts, strict=True):
            sample.images, pos = latents[pos : pos + n], pos + n
            writer.write(sample)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def encode_latents(
    src: str | Path,
    out: str | Path,
    *,
    vae_dir: str | Path,
    image_size: int = DataConfig.image_size,
    aspect_ratios: tuple[float, ...] = DataConfig.aspect_ratios,
    batch: int = 256,
    workers: int = 4,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool = False,
) -> EncodeReport:
    """Write the latent shards of every `*.tar` under `src` into `out`. A sample that cannot be decoded is
    logged (shard and key) and left out of its shard; a shard whose tar cannot be read is logged and left out
    entirely, and a rerun tries it again."""
    src, out = Path(src), Path(out)
    shards = sorted(src.rglob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards under {src}")
    if out.resolve() == src.resolve():
        raise ValueError(f"output directory {out} must differ from the source {src}")
    if batch < 1 or workers < 0:
        raise ValueError(f"need batch >= 1 and workers >= 0, got {batch} and {workers}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    dtypes = {
        "auto": torch.bfloat16 if dev.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    vae = load_vae(vae_dir, dtype=dtypes[dtype], device=dev)
    vae_dir = Path(vae_dir)
    info = {
        "source": str(src),
        "vae_config": json.loads((vae_dir / "config.json").read_text()),
        "vae_sha256": _sha256(vae_dir / "checkpoint.pt"),
        "latent_channels": vae.config.z_channels,
        "down_factor": vae.config.down_factor,
        "buckets": make_buckets(image_size, tuple(aspect_ratios)),
        "dtype": str(dtypes[dtype]).removeprefix("torch."),
    }
    out.mkdir(parents=True, exist_ok=True)
    old = out / INFO_NAME
    if old.exists():
        prev = json.loads(old.read_text())
        if (prev.get("vae_sha256"), prev.get("buckets")) != (info["vae_sha256"], [list(b) for b in info["buckets"]]):
            raise ValueError(f"{out} holds latents of another VAE or bucket set; use a new output directory")
    write_json(out / INFO_NAME, info, indent=1)
    paths = [out / f"latents-{k:06d}.tar" for k in range(len(shards))]
    todo = [k for k, p in enumerate(paths) if not p.exists()]
    if len(todo) < len(shards):
        log.info("%d of %d shards already encoded: skipping them", len(shards) - len(todo), len(shards))
    data = _ShardImages([shards[k] for k in todo], info["buckets"])
    # batch_size=None: each item is one shard as the worker made it (no collation).
    loader = DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    bar = tqdm(total=len(todo), unit="shard", disable=not progress)
    skipped: list[str] = []
    # Shards are written by a thread while the next one encodes; at most two wait, bounding memory.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: list[Future] = []
        for k, shard in zip(todo, loader, strict=True):
            if isinstance(shard, str):
                log.warning("skipping unreadable shard %s", shard)
                skipped.append(shard)
            else:
                for line in shard.skipped:
                    log.warning("skipping %s", line)
                skipped += shard.skipped
                pending.append(pool.submit(_write, out, k, shard, encode_pixels(vae, shard.groups, batch)))
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.pop(0).result()
                bar.update(1)
            if isinstance(shard, str):
                bar.update(1)
        for future in pending:
            future.result()
            bar.update(1)
    bar.close()
    return EncodeReport([p for p in paths if p.exists()], skipped)


def main(argv: list[str] | None = None) -> int:
    """`nextstep data encode-latents SRC OUT --vae DIR [--size 256 --aspect-ratios 1.0 --batch 256]`."""
    p = ArgumentParser(prog="nextstep data encode-latents", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="directory of image shards")
    p.add_argument("out", type=Path, help="output directory for the latent shards")
    p.add_argument("--vae", type=Path, required=True, help="VAE directory (config.json + checkpoint.pt)")
    p.add_argument(
        "--size", type=int, default=DataConfig.image_size, help="bucket size (data.image_size of the training run)"
    )
    p.add_argument(
        "--aspect-ratios",
        default=",".join(f"{r:.6g}" for r in DataConfig.aspect_ratios),
        help="comma-separated W/H bucket ratios (data.aspect_ratios of the training run; default: its default)",
    )
    p.add_argument("--batch", type=int, default=256, help="images per VAE call")
    p.add_argument("--workers", type=int, default=4, help="processes decoding shards")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="VAE dtype: auto (bf16 on CUDA), float32 or bfloat16")
    args = p.parse_args(argv)
    try:
        ratios = tuple(float(r) for r in args.aspect_ratios.split(","))
    except ValueError:
        p.error(f"--aspect-ratios must be comma-separated numbers, got {args.aspect_ratios!r}")
    if args.size < 16 or args.size % 16 or any(not r > 0 for r in ratios):
        p.error(f"--size must be a multiple of 16 and ratios positive, got {args.size} and {args.aspect_ratios}")
    try:
        report = encode_latents(
            args.src,
            args.out,
            vae_dir=args.vae,
            image_size=args.size,
            aspect_ratios=ratios,
            batch=args.batch,
            workers=args.workers,
            device=args.device,
            dtype=args.dtype,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"{len(report.paths)} latent shards in {args.out}; left out {len(report.skipped)} (see above)")
    return 1 if report.skipped else 0
