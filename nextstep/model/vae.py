"""Image tokenizer: the FLUX-style KL autoencoder NextStep uses, its NextStep latent post-processing
(patch LayerNorm of the mean, scalar shift/scale) and the official `<dir>/config.json + checkpoint.pt` format.

Parameter names equal the official checkpoint keys, so official weights load with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.io import torch_save, write_json

if TYPE_CHECKING:
    from PIL import Image

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "checkpoint.pt"
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of diffusers' DiagonalGaussianDistribution
ENCODER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Fields of the official `AutoEncoderParams`; defaults describe the released NextStep f8ch16 VAE."""

    resolution: int = 256  # nominal training resolution in pixels (informational, any size divisible works)
    in_channels: int = 3  # image channels in
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    out_ch: int = 3  # image channels out
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multipliers per level; downsampling 2**(len-1)
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder levels have one more)
    z_channels: int = 16  # latent channels C
    scaling_factor: float = 1.0  # model latents = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # see scaling_factor
    deterministic: bool = True  # sample = posterior mean (no noise) when encoding
    encoder_norm: bool = True  # parameter-free LayerNorm of the mean over each psz x psz patch
    psz: int = 2  # patch size of the encoder norm (and NextStep's latent patch size)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {list(self.ch_mult)}")
        for m in self.ch_mult:
            if (self.ch * m) % 32:
                raise ValueError(f"ch * ch_mult = {self.ch * m} must be a multiple of 32 (GroupNorm groups)")
        for name in ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "psz", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor must be non-zero, got 0")

    @property
    def down_factor(self) -> int:
        """Pixels per latent position along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError(f"unknown VAE config key {key!r}")
        for name in names:
            if name not in d:
                raise ValueError(f"VAE config is missing key {name!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VAEConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity holds no parameters, so the checkpoint has nin_shortcut only where channels change.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, 1x1 convs as projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, c)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only), as in the FLUX / LDM autoencoder.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels (B, in_channels, H, W) -> raw moments (B, 2C, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(cfg.num_res_blocks)
            )
            level.downsample = Downsample(block_out) if i != len(cfg.ch_mult) - 1 else nn.Identity()
            self.down.append(level)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.mid = MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Raw latents (B, C, h, w) -> pixels (B, out_ch, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(cfg.num_res_blocks + 1)
            )
            block_in = block_out
            level.upsample = Upsample(block_out) if i != 0 else nn.Identity()
            levels.insert(0, level)  # up.{i} is indexed by level, run from the last level to 0
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def patch_layer_norm(z: torch.Tensor, psz: int, eps: float = ENCODER_NORM_EPS) -> torch.Tensor:
    """Parameter-free LayerNorm over the C*psz*psz values of each psz x psz patch (NextStep `encoder_norm`).

    Feature order inside a patch is c*p*p + dy*p + dx, as in the official patchify.
    """
    b, c, h, w = z.shape
    p = psz
    x = z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, C, p, p)
    x = F.layer_norm(x.reshape(b, h // p, w // p, c * p * p), (c * p * p,), eps=eps)
    x = x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/p, p, w/p, p)
    return x.reshape(b, c, h, w)


class AutoEncoder(nn.Module):
    """Raw latents `z` are what the decoder consumes; model latents are `(z - shift) * scale`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] (B, 3, H, W) -> posterior (mean, logvar), each (B, C, H/f, W/f)."""
        moments = self.encoder(pixels)  # (B, 2C, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        if self.config.encoder_norm:
            mean = patch_layer_norm(mean, self.config.psz)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def sample_latents(
        self, mean: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Raw latents from the posterior: the mean if `deterministic`, else mean + std * noise."""
        if self.config.deterministic:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor

    def encode_raw(self, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> raw latents (B, C, H/f, W/f)."""
        return self.sample_latents(*self.encode_moments(pixels), generator=generator)

    def encode(self, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> model latents (B, C, H/f, W/f)."""
        return self.normalize_latents(self.encode_raw(pixels, generator=generator))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> pixels (B, 3, h*f, w*f), nominally in [-1, 1]."""
        return self.decoder(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents (B, C, h, w) -> pixels (B, 3, h*f, w*f), nominally in [-1, 1]."""
        return self.decode_raw(self.denormalize_latents(latents))


def save_vae(model: AutoEncoder, directory: str | os.PathLike) -> None:
    """Write `<directory>/config.json` and `<directory>/checkpoint.pt` (CPU tensors), the official layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save(state, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, model.config.to_dict())


def load_vae(
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AutoEncoder:
    """Load an official-layout VAE folder; returns the model in eval mode."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"VAE folder {directory} has no {name}")
    cfg = VAEConfig.from_json(directory / CONFIG_NAME)
    try:
        state = torch.load(directory / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read {directory / WEIGHTS_NAME} (truncated or not a torch file?): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{directory / WEIGHTS_NAME} holds a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        model = AutoEncoder(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match {CONFIG_NAME}: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: parameter {k} has shape {tuple(state[k].shape)}, "
                f"the config expects {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def pil_to_pixels(img: Image.Image) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    rgb = img.convert("RGB")
    w, h = rgb.size
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    x = x.permute(2, 0, 1).unsqueeze(0).float() / 255.0  # (1, 3, H, W)
    return (x - 0.5) / 0.5


def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) -> (B, H, W, 3) uint8 = round(clamp(x/2 + 0.5, 0, 1) * 255)."""
    x = (x.float() / 2 + 0.5).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1)


def pixels_to_pil(x: torch.Tensor) -> Image.Image:
    """One image (3, H, W) or (1, 3, H, W) in [-1, 1] -> PIL RGB image."""
    from PIL import Image  # only this helper needs PIL; the model itself stays torch-only

    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"pixels_to_pil takes one image, got a batch of {x.shape[0]}")
    return Image.fromarray(pixels_to_uint8(x)[0].cpu().numpy())
