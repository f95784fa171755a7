"""What an image request carries besides its options: its size ('WIDTHxHEIGHT', OpenAI's order) and, for an edit,
the uploaded image; bad values answered as the API's 400 errors (ApiError) naming the field."""

from __future__ import annotations

import math
import re

from PIL import Image

from nextstep.io import open_image
from nextstep.serve.middleware import ApiError


def parse_size(text: str | None, *, default: tuple[int, int], down: int, max_side: int) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (OpenAI order) -> (height, width); None or 'auto' -> default."""
    if text is None or text == "auto":
        return default
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if match is None:
        raise ApiError(f"size must look like WIDTHxHEIGHT, e.g. 512x512, got {text!r}", param="size")
    w, h = int(match[1]), int(match[2])
    if w % down or h % down or not (down <= w <= max_side and down <= h <= max_side):
        raise ApiError(
            f"size {text!r} is not supported: width and height must be multiples of {down} px, at most {max_side}",
            param="size",
        )
    return h, w


def fit_size(width: int, height: int, *, down: int, max_side: int) -> tuple[int, int]:
    """An edit's default output (height, width): the source's, shrunk to max_side and snapped down to `down`."""
    scale = min(1.0, max_side / max(width, height))
    return max(down, math.floor(height * scale / down) * down), max(down, math.floor(width * scale / down) * down)


def read_image(data: bytes, *, max_pixels: int, down: int) -> Image.Image:
    """Uploaded bytes -> RGB image; refuses non-images and oversize images before decoding them."""
    try:
        image = open_image(data, max_pixels=max_pixels)
    except ValueError as e:
        raise ApiError(str(e), param="image") from None
    if min(image.size) < down:
        raise ApiError(f"image is {image.width}x{image.height}, smaller than {down} px", param="image")
    return image.convert("RGB")
