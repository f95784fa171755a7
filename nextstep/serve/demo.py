"""Gradio web demo: a text-to-image tab and an editing tab over one Pipeline, with a progress bar over image tokens;
the text-to-image gallery shows the image forming (partial images as its token rows are drawn, then the final).
Editing is multi-turn: "Edit this result" edits the latest result (or an image sent from the text-to-image tab)
again, the history shows every turn with its instruction, and "Undo" drops the last one. Its sampling controls
(ranges, labels) come from the GenerateOptions schema; uploads go through io.open_image.

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

from PIL import Image

from nextstep.args import ArgumentParser
from nextstep.io import MAX_PIXELS, open_image
from nextstep.sampling import chain
from nextstep.sampling.options import FIELDS, GenerateOptions, size_arg
from nextstep.sampling.partial import every_rows
from nextstep.sampling.pipeline import Pipeline
from nextstep.serve.inputs import fit_size
from nextstep.serve.stream import DEFAULT_PARTIAL_IMAGES

log = logging.getLogger(__name__)

# Gradio reads this at import: no usage reports or version checks leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the default theme would fetch Google Fonts
SYSTEM_MONO = ["ui-monospace", "monospace"]


def history(turns: list[Image.Image]) -> list[tuple[Image.Image, str]]:
    """A chain's images after its first (the one its edits started from), each captioned with its turn."""
    out = []
    for image in turns[1:]:
        turn = chain.Chain.from_json(image.info[chain.KEY]).turns[-1]
        out.append((image, f"{turn.turn}. {turn.prompt} (seed {turn.seed})"))
    return out


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
    model: str | None = None,
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    max_side: int = 1024,
    max_n: int = 4,
    max_pixels: int = MAX_PIXELS,
    previews: int = DEFAULT_PARTIAL_IMAGES,
):
    """The gr.Blocks app. `model` is the model's name as recorded in each image's settings; `size` (height,
    width) and `steps` set the controls' starting values; uploads over `max_pixels` are refused before they
    are decoded; `previews` partial images show text-to-image forming."""
    import gradio as gr

    if previews < 0:
        raise ValueError(f"partial images must be >= 0, got {previews}")
    defaults = GenerateOptions(**pipe.defaults)
    h, w = size or defaults.size
    steps = steps or defaults.steps
    down = pipe.down_factor
    track = gr.Progress(track_tqdm=True)  # as a default argument it tells Gradio to follow the pipeline's tqdm bar

    def generate(prompt, width, height, seed, cfg, num_steps, n, progress=track):
        """Partial images as they form, then the images, again as the state "Edit this result" picks from (the
        gallery's copies lose their records); the selection goes back to the first."""
        size = (int(height), int(width))
        options = dict(size=size, seed=int(seed), cfg=float(cfg), steps=int(num_steps), n=int(n), progress=True)
        run = functools.partial(chain.generate, pipe, prompt, model=model, **options)
        try:
            for images, note in progressive(pipe, size, run, previews=previews):
                done = note == "Done"
                yield images, note, (images if done else gr.skip()), (0 if done else gr.skip())
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def slider(name: str, value, **kwargs):
        """A slider for option `name`: range and step from the schema's `ui`, label from its help."""
        lo, hi, step = FIELDS[name].metadata["ui"]
        label = FIELDS[name].metadata["help"]
        return gr.Slider(lo, hi, value=value, step=step, label=label[0].upper() + label[1:], **kwargs)

    def run_edit(turns: list[Image.Image], instruction, seed, cfg, cfg_img, num_steps):
        """`turns` and the edit of its last image: turn k of a chain takes seed + k - 1, as edit --then does."""
        try:
            (result,) = chain.edit_chain(
                pipe,
                turns[-1],
                [instruction],
                model=model,
                size=fit_size(*turns[-1].size, down=down, max_side=max_side),  # large uploads shrink to the limit
                seed=chain.turn_seed(int(seed), len(turns) - 1),
                cfg=float(cfg),
                cfg_img=float(cfg_img),
                steps=int(num_steps),
                progress=True,
            )
        except ValueError as e:
            raise gr.Error(str(e)) from None
        turns = [*turns, result]
        return [result], turns, history(turns)

    def edit(path: str | None, instruction, seed, cfg, cfg_img, num_steps, progress=track):
        """A new chain from the uploaded image."""
        if path is None:
            raise gr.Error("upload an image to edit")
        try:
            image = open_image(path, max_pixels=max_pixels, what="uploaded image")
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return run_edit([image], instruction, seed, cfg, cfg_img, num_steps)

    def edit_again(turns, instruction, seed, cfg, cfg_img, num_steps, progress=track):
        if not turns:
            raise gr.Error("nothing to edit yet: press Edit, or send a generated image here")
        return run_edit(turns, instruction, seed, cfg, cfg_img, num_steps)

    def undo(turns):
        turns = turns[:-1] if len(turns) > 1 else turns
        return turns[-1:] if len(turns) > 1 else [], turns, history(turns)

    def pick(event) -> int:
        return event.index

    pick.__annotations__["event"] = gr.SelectData  # an object, not a string: how Gradio finds where to pass it

    def send_to_edit(images, selected):
        """The text-to-image result picked (the selected one, else the first) as the start of the edit chain."""
        if not images:
            raise gr.Error("generate an image first")
        image = images[min(selected, len(images) - 1)]
        return image, [], [image], [], gr.Tabs(selected="edit")

    with gr.Blocks(title="NextStep", analytics_enabled=False) as demo:
        gr.Markdown("# NextStep\nAutoregressive image generation with continuous tokens.")
        # The edit tab's chain: the image its edits started from, then each turn's result, records in info.
        turns = gr.State([])
        generated = gr.State([])  # the text-to-image results, records in info
        selected = gr.State(0)  # the text-to-image result picked in the gallery
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="t2i"):
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
                        to_edit = gr.Button("Edit this result", elem_id="t2i-edit")
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column():
                        source = gr.Image(  # a path, not pixels: open_image checks the size before decoding
                            type="filepath",
                            image_mode=None,
                            format="png",
                            label="Image",
                            sources=["upload", "clipboard"],
                            elem_id="edit-source",
                        )
                        instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-instruction")
                        edit_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (+1 for each further turn)")
                        edit_cfg = slider("cfg", pipe.edit_defaults["cfg"], elem_id="edit-cfg")
                        edit_cfg_img = slider("cfg_img", pipe.edit_defaults["cfg_img"])
                        edit_steps = slider("steps", steps)
                        with gr.Row():
                            edit_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                            edit_again_run = gr.Button("Edit this result", elem_id="edit-again")
                            edit_undo = gr.Button("Undo", elem_id="edit-undo")
                    with gr.Column():
                        edited = gr.Gallery(
                            label="Result", columns=1, format="png", object_fit="contain", elem_id="edit-gallery"
                        )
                        turn_list = gr.Gallery(label="History", columns=4, format="png", elem_id="edit-history")
        controls = [instruction, edit_seed, edit_cfg, edit_cfg_img, edit_steps]
        one_at_a_time = dict(concurrency_id="pipeline", concurrency_limit=1)  # one pipeline, one KV cache
        run.click(
            generate,
            [prompt, width, height, seed, cfg, num_steps, n],
            [gallery, status, generated, selected],
            **one_at_a_time,
        )
        gallery.select(pick, None, selected)
        to_edit.click(send_to_edit, [generated, selected], [source, edited, turns, turn_list, tabs])
        edit_run.click(edit, [source, *controls], [edited, turns, turn_list], **one_at_a_time)
        edit_again_run.click(edit_again, [turns, *controls], [edited, turns, turn_list], **one_at_a_time)
        edit_undo.click(undo, turns, [edited, turns, turn_list])
    return demo


def theme():
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nextstep demo", description=__doc__.split("\n\n")[0])
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
    from nextstep.hub import BUILTIN, resolve_model_dir

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pipe = Pipeline.from_pretrained(resolve_model_dir(args.model), device=args.device)
    model = args.model or BUILTIN
    demo = build_demo(
        pipe,
        model=model,
        size=args.size,
        steps=args.steps,
        max_side=args.max_side,
        max_n=args.max_n,
        previews=args.partial_images,
    )
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=theme(), ssr_mode=False, share=False)
    return 0


if __name__ == "__main__":
    sys.exit(main_demo())
