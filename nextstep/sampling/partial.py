"""Partial images of a generation in progress: the token rows sampled so far decoded, the rows below them flat.

previews = []
on_token = every_rows(pipe, (128, 128), rows=2, on_partial=lambda rows, images: previews.append(images))
final = pipe.generate("a red circle", size=(128, 128), on_token=on_token)  # previews[-1] == final
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from nextstep.model.vae import pixels_to_pil
from nextstep.sampling.pipeline import OnToken, Pipeline

# on_partial(rows, images): `rows` image-token rows of the grid are drawn; `images` one PIL image per batch row.
OnPartial = Callable[[int, list[Image.Image]], None]


def fill_tokens(tokens: torch.Tensor, total: int) -> torch.Tensor:
    """(B, k, D) tokens so far -> (B, total, D): the missing tokens are each image's mean token so far.

    The mean rather than zeros: zero is the mean of the normalised latent over the training set, a flat grey
    that reads as 'empty', while each image's own mean continues its colours, so a half-drawn image shows
    its palette and the seam to the undrawn part is soft (the VAE decoder mixes neighbouring latents).
    """
    b, k, d = tokens.shape
    rest = tokens.mean(dim=1, keepdim=True).expand(b, total - k, d)  # (B, total - k, D)
    return torch.cat([tokens, rest], dim=1)


def decode_partial(pipe: Pipeline, tokens: torch.Tensor, size: tuple[int, int]) -> list[Image.Image]:
    """(B, k, D) image tokens sampled so far of (height, width) px images -> B partial PIL images of that size.

    Only the token rows begun so far are decoded (a row begun is completed with fill_tokens): the decode, the
    cost of a partial image, shrinks with the part drawn (half the grid, half a decode). The rows below are
    each image's mean colour. With every token (k = h*w) this is exactly the pipeline's final decode.
    """
    h, w = pipe.grid(size)
    if not 0 < tokens.shape[1] <= h * w:
        raise ValueError(f"got {tokens.shape[1]} tokens for a grid of {h}x{w}")
    rows = -(-tokens.shape[1] // w)
    with torch.inference_mode():
        pixels = pipe.decode_tokens(fill_tokens(tokens.float(), rows * w), rows, w)  # (B, 3, rows * d, W)
        below = pixels.mean(dim=(2, 3), keepdim=True).expand(-1, -1, size[0] - pixels.shape[2], size[1])
        pixels = torch.cat([pixels, below], dim=2)  # (B, 3, H, W)
    return [pixels_to_pil(x) for x in pixels]


def every_rows(
    pipe: Pipeline, size: tuple[int, int], *, rows: int, on_partial: OnPartial, final: bool = True
) -> OnToken:
    """An on_token callback for pipe.generate/edit at `size` calling on_partial(rows_done, images) every `rows`
    image-token rows and, with `final`, after the last token (its images are then the final ones). A stream
    that sends the pipeline's own result last passes final=False and saves that decode."""
    if rows <= 0:
        raise ValueError(f"rows (image-token rows between partial images) must be > 0, got {rows}")
    h, w = pipe.grid(size)

    def on_token(k: int, tokens: torch.Tensor) -> None:
        done = k + 1
        if (done == h * w and final) or (done < h * w and done % (rows * w) == 0):
            on_partial(-(-done // w), decode_partial(pipe, tokens, size))

    return on_token
