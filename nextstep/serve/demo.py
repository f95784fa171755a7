"""Gradio web demo: a text-to-image tab and an editing tab over one Pipeline, with a progress bar over image tokens;
the text-to-image gallery shows the image forming (partial images as its token rows are drawn, then the final).
Its sampling controls (ranges, labels) come from the GenerateOptions schema; uploads go through io.open_image.

nextstep demo --model path/to/checkpoint --host 127.0.0.1 --port 7860
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator

from nextstep.io import MAX_PIXELS, open_image
from nextstep.sampling.options import FIELDS, GenerateOptions, size_arg
from nextstep.sampling.partial import every_rows
from nextstep.sampling.pipeline import Pipeline
from nextstep.serve.api import fit_size
from nextstep.serve.stream import DEFAULT_PARTIAL_IMAGES

log = logging.getLogger(__name__)

# Gradio reads this at import: no usage reports or version checks leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the default theme would fetch Google Fonts
SYSTEM_MONO = ["ui-monospace", "monospace"]


class Stopped(Exception):
    """Raised between image tokens once the page stopped listening (the generator was closed)."""


def progressive(
    pipe: Pipeline, size: tuple[int, int], run: Callable[..., list], *, previews: int
) -> Iterator[tuple[list, str]]:
    """Yields (images, status) as `run(on_token=...)` draws images of (height, width) `size` in a worker thread:
    up to `previews` partial images, one every ceil(rows / (previews + 1)) token rows, then the final images
    with status "Done". Closing the generator (the page went away) stops the generation at its next token and
    waits for it; run's exceptions propagate."""
    grid = size[0] // pipe.down_factor
    updates: queue.Queue = queue.Queue()
    stop = threading.Event()

    def on_partial(rows: int, images: list) -> None:
        updates.put((images, f"Partial image: {rows} of {grid} token rows drawn"))

    every = max(1, -(-grid // (previews + 1)))  # a size too small for a token row: the pipeline says so
    partial = every_rows(pipe, size, rows=every, on_partial=on_partial, final=False)

    def on_token(k: int, tokens) -> None:
        if stop.is_set():
            raise Stopped(f"stopped after token {k}: nobody is watching")
        partial(k, tokens)

    def work() -> None:
        try:
            updates.put(run(on_token=on_token))  # the final images: a list, where partial updates are tuples
        except Exception as e:
            updates.put(e)

    worker = threading.Thread(target=work, name="nextstep-demo", daemon=True)
    worker.start()
    try:
        while isinstance(update := updates.get(), tuple):
            yield update
        if isinstance(update, Exception):
            raise update
        yield update, "Done"
    finally:
        stop.set()
        worker.join()  # the next call starts once this one has stopped: one pipeline, one call at a time


def build_demo(
    pipe: Pipeline,
    *,
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    max_side: int = 1024,
    max_n: int = 4,
    max_pixels: int = MAX_PIXELS,
    previews: int = DEFAULT_PARTIAL_IMAGES,
):
    """The gr.Blocks app. `size` (height, width) and `steps` set the controls' starting values; uploads over
    `max_pixels` are refused before they are decoded; `previews` partial images show text-to-image forming."""
    import gradio as gr

    if previews < 0:
        raise ValueError(f"partial images must be >= 0, got {previews}")
    defaults = GenerateOptions(**pipe.defaults)
    h, w = size or defaults.size
    steps = steps or defaults.steps
    down = pipe.down_factor
    track = gr.Progress(track_tqdm=True)  # as a default argument it tells Gradio to follow the pipeline's tqdm bar

    def generate(prompt, width, height, seed, cfg, num_steps, n, progress=track):
        size = (int(height), int(width))
        options = dict(size=size, seed=int(seed), cfg=float(cfg), steps=int(num_steps), n=int(n), progress=True)
        try:
            yield from progressive(pipe, size, functools.partial(pipe.generate, prompt, **options), previews=previews)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def slider(name: str, value, **kwargs):
        """A slider for option `name`: range and step from the schema's `ui`, label from its help."""
        lo, hi, step = FIELDS[name].metadata["ui"]
        label = FIELDS[name].metadata["help"]
        return gr.Slider(lo, hi, value=value, step=step, label=label[0].upper() + label[1:], **kwargs)

    def edit(path: str | None, instruction, seed, cfg, cfg_img, num_steps, progress=track):
        if path is None:
            raise gr.Error("upload an image to edit")
        try:
            image = open_image(path, max_pixels=max_pixels, what="uploaded image")
            return pipe.edit(
                image,
                instruction,
                size=fit_size(*image.size, down=down, max_side=max_side),  # large uploads shrink to the slider limit
                seed=int(seed),
                cfg=float(cfg),
                cfg_img=float(cfg_img),
                steps=int(num_steps),
                progress=True,
            )
        except ValueError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="NextStep", analytics_enabled=False) as demo:
        gr.Markdown("# NextStep\nAutoregressive image generation with continuous tokens.")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="t2i-prompt")
                    with gr.Row():
                        width = gr.Slider(down, max_side, value=w, step=down, label="Width")
                        height = gr.Slider(down, max_side, value=h, step=down, label="Height")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                        n = gr.Slider(1, max_n, value=1, step=1, label="Images")
                    cfg = slider("cfg", defaults.cfg)
                    num_steps = slider("steps", steps)
                    run = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="t2i-gallery")
                    status = gr.Markdown(elem_id="t2i-status")
            run.click(
                generate,
                [prompt, width, height, seed, cfg, num_steps, n],
                [gallery, status],
                concurrency_id="pipeline",
                concurrency_limit=1,
            )
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(  # a path, not pixels: open_image checks the size before decoding
                        type="filepath",
                        image_mode=None,
                        label="Image",
                        sources=["upload", "clipboard"],
                        elem_id="edit-source",
                    )
                    instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-instruction")
                    edit_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    edit_cfg = slider("cfg", pipe.edit_defaults["cfg"], elem_id="edit-cfg")
                    edit_cfg_img = slider("cfg_img", pipe.edit_defaults["cfg_img"])
                    edit_steps = slider("steps", steps)
                    edit_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                edited = gr.Gallery(label="Edited", columns=1, format="png", elem_id="edit-gallery")
            edit_run.click(
                edit,
                [source, instruction, edit_seed, edit_cfg, edit_cfg_img, edit_steps],
                edited,
                concurrency_id="pipeline",  # one pipeline: its KV caches serve one call at a time
                concurrency_limit=1,
            )
    return demo


def theme():
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextstep demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--size", type=size_arg, default=None, help="starting WIDTHxHEIGHT (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="starting steps (default: the checkpoint's)")
    p.add_argument("--max-side", type=int, default=1024, help="largest width/height the sliders allow")
    p.add_argument("--max-n", type=int, default=4, help="most images per generation")
    p.add_argument(
        "--partial-images",
        type=int,
        default=DEFAULT_PARTIAL_IMAGES,
        help="partial images shown as an image forms (0: none; each costs part of a decode, see BENCHMARKS.md)",
    )
    return p


def main_demo(argv: list[str] | None = None) -> int:
    from nextstep.hub import resolve_model_dir

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pipe = Pipeline.from_pretrained(resolve_model_dir(args.model), device=args.device)
    demo = build_demo(
        pipe, size=args.size, steps=args.steps, max_side=args.max_side, max_n=args.max_n, previews=args.partial_images
    )
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=theme(), ssr_mode=False, share=False)
    return 0


if __name__ == "__main__":
    sys.exit(main_demo())
