"""Connect a checkpoint to the evaluators: a batched generate function over (prompt, source image) items."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from nextstep.model.vae import load_vae, pil_to_pixels, pixels_to_pil
from nextstep.sampling.pipeline import Pipeline
from nextstep.shapes.evaluate import GenerateFn, reference_fn
from nextstep.shapes.prompts import Prompt


def pipeline_generate_fn(
    model_dir: Path, *, seed: int = 0, edit_options: dict | None = None, quantize: str = "none", **options
) -> GenerateFn:
    """Text-to-image items go through `generate`, items with a source image through `edit`, in order.
    `options` override the checkpoint's sampling defaults for both; `edit_options` for edits only; quantize:
    none | fp8 | int8 weights (Pipeline.from_pretrained)."""
    edit_options = {**options, **(edit_options or {})}
    pipe = Pipeline.from_pretrained(model_dir, quantize=quantize)

    def generate(items: list[tuple[str, Image.Image | None]]) -> list[Image.Image]:
        out: list[Image.Image | None] = [None] * len(items)
        t2i = [i for i, (_, src) in enumerate(items) if src is None]
        edits = [i for i, (_, src) in enumerate(items) if src is not None]
        if t2i:
            for i, img in zip(t2i, pipe.generate([items[i][0] for i in t2i], seed=seed, **options), strict=True):
                out[i] = img
        if edits:
            images = pipe.edit([items[i][1] for i in edits], [items[i][0] for i in edits], seed=seed, **edit_options)
            for i, img in zip(edits, images, strict=True):
                out[i] = img
        return out

    return generate


def vae_reference_fn(model_dir: Path, prompts: list[Prompt]) -> GenerateFn:
    """Answer `prompts` (in call order) with their rendered reference scenes, encoded and decoded by
    model_dir/vae: what the images of a model that always drew the right scene would look like."""
    vae = load_vae(Path(model_dir) / "vae", dtype=torch.float32)
    render = reference_fn(prompts)

    def generate(items: list[tuple[str, Image.Image | None]]) -> list[Image.Image]:
        pixels = torch.cat([pil_to_pixels(img) for img in render(items)])  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels)).clamp(-1, 1)
        return [pixels_to_pil(x) for x in decoded]

    return generate


def _shapes_fn(model_dir: Path, *, reference: list[Prompt] | None = None, **options) -> GenerateFn:
    return pipeline_generate_fn(model_dir, **options) if reference is None else vae_reference_fn(model_dir, reference)


def main_shapes(argv: list[str] | None = None) -> int:
    """`nextstep eval shapes [--model DIR] [--split in|heldout] [--n N] [--ceiling]`."""
    from nextstep.shapes.evaluate import main

    return main(argv, _shapes_fn)
