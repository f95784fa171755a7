"""The `nextstep` command.

nextstep generate "two red circles above a blue star" -o out.png [--model DIR]
nextstep edit --image in.png "make the star green" -o out.png
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from nextstep.io import MAX_PIXELS, check_writable, open_image, save_png
from nextstep.sampling.options import (
    MAX_PROMPT_TOKENS,
    GenerateOptions,
    add_option_args,
    check_options,
    given_options,
)

# Subcommands implemented in their own modules, each a `main(argv) -> int`.
FORWARDED = {
    ("train",): "nextstep.train.loop:main",
    ("launch",): "nextstep.train.launch:main",
    ("export",): "nextstep.train.export:main",
    ("config",): "nextstep.train.config:main",
    ("data", "synth-shapes"): "nextstep.shapes.synth:main",
    ("data", "build-wds"): "nextstep.data.tools:main_build_wds",
    ("data", "meta"): "nextstep.data.tools:main_gen_meta",
    ("data", "warmup"): "nextstep.data.tools:main_warmup",
    ("data", "encode-latents"): "nextstep.data.latents:main",
    ("data", "preview"): "nextstep.data.preview:main_preview",
    ("data", "train-tokenizer"): "nextstep.train.tokenizer:main",
    ("vae", "train"): "nextstep.train.vae:main",
    ("eval", "shapes"): "nextstep.eval.generate:main_shapes",
    ("eval", "gen-images"): "nextstep.eval.gen_images:main",
    ("serve",): "nextstep.serve.api:main_serve",
    ("demo",): "nextstep.serve.demo:main_demo",
    ("models",): "nextstep.hub:main_models",
    ("download",): "nextstep.hub:main_download",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `nextstep: error: ...` line, like every other error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class UsageError(ValueError):
    pass


def _add_sampling_args(p: argparse.ArgumentParser, *, edit: bool) -> None:
    p.add_argument("prompt", help="instruction" if edit else "text prompt")
    p.add_argument("-o", "--output", default="out.png", help="output PNG; with --n > 1, name_0.png, name_1.png, ...")
    p.add_argument("--model", default=None, help="directory, Hugging Face id[@rev] or zoo name (default: built in)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--quantize", choices=("none", "int8", "fp8"), default="none", help="weight-only quantisation (decoder, head)"
    )
    if edit:
        p.add_argument("--image", required=True, help=f"input image to edit (at most {MAX_PIXELS} pixels)")
    # an output option, not a sampling one (the images are the same with or without it): here, not in the schema
    p.add_argument(
        "--preview-every",
        type=_positive,
        default=None,
        metavar="K",
        help="also write the image as it forms, every K image-token rows: OUTPUT.partial-01.png, -02, ... next to "
        "each output (rows not drawn yet filled with the mean of those drawn)",
    )
    add_option_args(p, "edit" if edit else "generate")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of token rows, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nextstep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_sampling_args(sub.add_parser("generate", help="text-to-image"), edit=False)
    _add_sampling_args(sub.add_parser("edit", help="instruction-based image editing"), edit=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path in FORWARDED:
        target = sub
        for part in path[:-1]:
            if part not in groups:
                groups[part] = sub.add_parser(part).add_subparsers(dest=f"{part}_command", required=True)
            target = groups[part]
        target.add_parser(path[-1], add_help=False)
    return parser


def output_paths(output: str, n: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {output!r}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def preview_writer(pipe, size: tuple[int, int], rows: int, paths: list[Path]):
    """An on_token callback writing each output's partial images every `rows` token rows, as OUT.partial-NN.png."""
    from nextstep.sampling.partial import every_rows

    written = 0

    def write(done_rows: int, images) -> None:
        nonlocal written
        written += 1
        for image, path in zip(images, paths, strict=True):
            save_png(image, path.with_name(f"{path.stem}.partial-{written:02d}{path.suffix}"))
        logging.getLogger(__name__).info("partial image %d: %d token rows", written, done_rows)

    return every_rows(pipe, size, rows=rows, on_partial=write, final=False)  # the final image is the output


def run_sampling(args: argparse.Namespace) -> int:
    """Check everything a user typed (options, prompt, output, input image) before loading the model, then run."""
    import nextstep
    from nextstep.hub import resolve_model_dir
    from nextstep.model.checkpoint import check_model_dir, read_down_factor
    from nextstep.model.tokenizer import TextTokenizer

    options = given_options(args)
    if not args.prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {args.prompt!r}")
    paths = output_paths(args.output, options.get("n", 1))
    for path in paths:
        check_writable(path)
    model_dir = check_model_dir(resolve_model_dir(args.model))
    check_options(GenerateOptions(**options), read_down_factor(model_dir))  # unset options: valid defaults
    n_text = len(TextTokenizer(model_dir).encode(args.prompt))
    if n_text > MAX_PROMPT_TOKENS:
        raise ValueError(f"prompt of {n_text} tokens exceeds the limit of {MAX_PROMPT_TOKENS}")
    source = open_image(args.image, what="input image") if args.command == "edit" else None
    pipe = nextstep.load(model_dir, device=args.device, quantize=args.quantize)
    options = {**options, "progress": True}
    if args.preview_every is not None:
        # the size the pipeline will use: the flag's, else the source's (snapped to tokens) or the checkpoint's
        size = options.get("size") or (pipe._snap(source.size) if source else GenerateOptions(**pipe.defaults).size)
        options["on_token"] = preview_writer(pipe, size, args.preview_every, paths)
    if args.command == "edit":
        images = pipe.edit(source, args.prompt, **options)
    else:
        images = pipe.generate(args.prompt, **options)
    for image, path in zip(images, paths, strict=True):
        save_png(image, path)
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        for path, target in FORWARDED.items():
            if tuple(argv[: len(path)]) == path:
                module, func = target.split(":")
                return getattr(importlib.import_module(module), func)(argv[len(path) :]) or 0
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return run_sampling(args)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, an unreadable file, a full disk
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
