"""Resolution buckets: aspect-ratio buckets of about one pixel count, fitting an image into one, and the
uint8 pixel tensors the loader hands out."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def make_buckets(image_size: int, aspect_ratios: tuple[float, ...], *, multiple: int = 16) -> list[tuple[int, int]]:
    """(H, W) buckets of about image_size**2 pixels, one per aspect ratio W/H, sides rounded to `multiple`."""
    buckets = []
    for ar in aspect_ratios:
        h = max(multiple, round(image_size / math.sqrt(ar) / multiple) * multiple)
        w = max(multiple, round(image_size * math.sqrt(ar) / multiple) * multiple)
        if (h, w) not in buckets:
            buckets.append((h, w))
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space."""
    ar = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ar))


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB image of `size` (H, W): the largest centered crop of the target aspect ratio, resized."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels go on white; convert("RGB") would expose whatever color they stored.
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    h, w = size
    sw, sh = image.size
    cw, ch = (sh * w / h, sh) if sw * h > sh * w else (sw, sw * h / w)
    box = ((sw - cw) / 2, (sh - ch) / 2, (sw + cw) / 2, (sh + ch) / 2)
    return image.resize((w, h), Image.Resampling.BICUBIC, box=box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor (3, H, W). Pixels cross processes and go to the GPU as bytes, a quarter of
    float32; `normalize_pixels` makes them [-1, 1] floats where they are used."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def normalize_pixels(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> `dtype` in [-1, 1], computed in float32 (x / 127.5 - 1)."""
    return (x.float() * (1 / 127.5) - 1.0).to(dtype)
