"""VAE training on CPU: a tiny model on random-shape images lowers the reconstruction loss, writes a VAE
that `load_vae` loads with calibrated shift/scale, resumes exactly; the CLI reads PNG folders and shards."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from nextstep.model.vae import load_vae, pixels_to_pil
from nextstep.train.vae import VAETrainConfig, image_batches, main, psnr, train_vae

TINY = dict(size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, batch=8, lr=1e-3, warmup_steps=5, workers=0)


def shape_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: a flat background with a random rectangle and a random disc."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        img = (torch.rand(3, 1, 1, generator=g) * 2 - 1).expand(3, size, size).clone()
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        cx, cy, r = torch.rand(3, generator=g) * torch.tensor([size, size, size / 4]) + torch.tensor([0, 0, 3])
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img[:, disc] = torch.rand(3, 1, generator=g) * 2 - 1
        images.append(img)
    # Zero per-image channel means: the decoder's last GroupNorm (one channel per group at ch=32) makes the
    # absolute colour of an image slow to learn, while shapes are learnt within a few dozen steps.
    images = torch.stack(images)
    return (images - images.mean(dim=(2, 3), keepdim=True)).clamp(-1, 1)


def test_psnr() -> None:
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a, a + 0.2).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), rel=1e-5)


def test_training_lowers_loss_and_writes_loadable_vae(tmp_path: Path) -> None:
    images = shape_images(32, 16)
    cfg = VAETrainConfig(**TINY, steps=40, save_every=20, log_every=10)
    result = train_vae(images, cfg, tmp_path, progress=False)
    first, last = sum(result.mse_history[:10]) / 10, sum(result.mse_history[-10:]) / 10
    assert len(result.mse_history) == 40 and last < 0.5 * first, (first, last)
    vae = load_vae(tmp_path)
    assert vae.config.shift_factor == result.shift_factor and vae.config.scaling_factor == result.scaling_factor
    with torch.no_grad():
        latents = vae.encode(images)
        recon = vae.decode(latents)
    assert latents.shape == (32, 16, 8, 8)
    # Calibration makes the model latents zero-mean, unit-std on the calibration images.
    assert abs(latents.mean().item()) < 1e-3 and latents.std().item() == pytest.approx(1.0, abs=1e-3)
    assert psnr(recon, images).item() == pytest.approx(result.eval_psnr, abs=1e-3)
    assert result.eval_psnr > 10 * math.log10(4 / first) + 2


def test_resume_is_exact(tmp_path: Path) -> None:
    images = shape_images(16, 16)
    straight = train_vae(images, VAETrainConfig(**TINY, steps=8, save_every=4), tmp_path / "a", progress=False)
    train_vae(images, VAETrainConfig(**TINY, steps=4, save_every=4), tmp_path / "b", progress=False)
    resumed = train_vae(
        images, VAETrainConfig(**TINY, steps=8, save_every=4), tmp_path / "b", resume=True, progress=False
    )
    assert resumed.start_step == 4 and resumed.step == 8 and len(resumed.mse_history) == 4
    assert resumed.mse_history == straight.mse_history[4:]
    a, b = load_vae(tmp_path / "a"), load_vae(tmp_path / "b")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    assert a.config == b.config


def test_resume_without_state_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        train_vae(shape_images(8, 16), VAETrainConfig(**TINY, steps=2), tmp_path, resume=True, progress=False)


def test_image_batches_from_pngs_and_shards(tmp_path: Path) -> None:
    images = shape_images(8, 40)
    (tmp_path / "pngs").mkdir()
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000000.tar", "w") as tar:
        for i, img in enumerate(images):
            pixels_to_pil(img).save(tmp_path / "pngs" / f"{i}.png")
            buf = io.BytesIO()
            pixels_to_pil(img).save(buf, format="PNG")
            for name, data in ((f"s{i}.json", b"{}"), (f"s{i}-0.png", buf.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for folder in ("pngs", "shards"):
        batch = next(image_batches(tmp_path / folder, 32, 4, workers=0))  # 40px images, resized
        assert batch.shape == (4, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    with pytest.raises(ValueError, match="no \\*.tar shards"):
        next(image_batches(tmp_path / "pngs", 32, 9, workers=0))
    Image.new("RGB", (32, 32)).save(tmp_path / "pngs" / "extra.png")
    main(
        [
            "--data",
            str(tmp_path / "pngs"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--batch",
            "4",
            "--size",
            "32",
            "--ch",
            "32",
            "--ch-mult",
            "1,2",
            "--num-res-blocks",
            "1",
            "--workers",
            "0",
            "--calib-images",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert load_vae(tmp_path / "run").config.ch_mult == (1, 2)
