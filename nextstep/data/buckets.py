"""Resolution buckets: aspect-ratio buckets of about one pixel count, and fitting an image into one."""

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
    """uint8 RGB image -> float tensor (3, H, W) in [-1, 1]."""
    # In numpy: one single-threaded pass; torch ops here would contend for threads in the main process.
    x = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
    x *= 1 / 127.5
    x -= 1.0
    return torch.from_numpy(x)
