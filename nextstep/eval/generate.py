"""Connect a checkpoint to the evaluators: a batched generate function over (prompt, source image) items."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from nextstep.eval.shapes import GenerateFn
from nextstep.sampling.pipeline import Pipeline


def pipeline_generate_fn(model_dir: Path, *, seed: int = 0, edit_options: dict | None = None, **options) -> GenerateFn:
    """Text-to-image items go through `generate`, items with a source image through `edit`, in order.
    `options` override the checkpoint's sampling defaults for both; `edit_options` for edits only."""
    edit_options = {**options, **(edit_options or {})}
    pipe = Pipeline.from_pretrained(model_dir)

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


def main_shapes(argv: list[str] | None = None) -> int:
    """`nextstep eval shapes --model DIR [--split in|heldout] [--n N]`."""
    from nextstep.eval.shapes import main

    return main(argv, pipeline_generate_fn)
