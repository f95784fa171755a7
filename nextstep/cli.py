"""The `nextstep` command.

nextstep generate "two red circles above a blue star" -o out.png [--model DIR]
nextstep edit --image in.png "make the star green" -o out.png
nextstep edit --image in.png "make the star yellow" --then "add a blue circle on the left" -o out.png
nextstep replay out.png
nextstep quantize path/to/NextStep-1.1 path/to/NextStep-1.1-fp8 --mode fp8
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from nextstep.args import ArgumentParser
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
    ("quantize",): "nextstep.sampling.quant_checkpoint:main",
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


def _add_model_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", default=None, help=f"directory, Hugging Face id[@rev] or zoo name (default: {default})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--quantize", choices=("none", "int8", "fp8"), default="none", help="weight-only quantisation (decoder, head)"
    )


def _add_sampling_args(p: argparse.ArgumentParser, *, edit: bool) -> None:
    p.add_argument("prompt", help="instruction" if edit else "text prompt")
    output = "output PNG, recording its settings for `nextstep replay`; with --n > 1, name_0.png, name_1.png, ..."
    p.add_argument("-o", "--output", default="out.png", help=output)
    _add_model_args(p, "built in")
    if edit:
        p.add_argument("--image", required=True, help=f"input image to edit (at most {MAX_PIXELS} pixels)")
        p.add_argument(
            "--then",
            action="append",
            default=[],
            metavar="INSTRUCTION",
            help="edit the result again (repeatable); turn k takes seed + k - 1; with -o out.png the turns before "
            "the last are written as out.turn1.png, out.turn2.png, ... and the last as out.png; not with --n > 1",
        )
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
    parser = ArgumentParser(prog="nextstep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _add_sampling_args(sub.add_parser("generate", help="text-to-image"), edit=False)
    _add_sampling_args(sub.add_parser("edit", help="instruction-based image editing"), edit=True)
    replay = sub.add_parser("replay", help="make a PNG of generate or edit again from the settings it records")
    replay.add_argument("png", help="a PNG written by nextstep generate or edit")
    replay.add_argument("-o", "--output", default=None, help="replayed PNG (default: NAME.replay.png beside it)")
    replay.add_argument("--image", default=None, help="the first edit's source image (default: its recorded path)")
    _add_model_args(replay, "the recorded one")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path in FORWARDED:
        target = sub
        for part in path[:-1]:
            if part not in groups:
                groups[part] = sub.add_parser(part).add_subparsers(dest=f"{part}_command", required=True)
            target = groups[part]
        target.add_parser(path[-1], add_help=False)
    return parser


def output_paths(output: str, n: int, turns: int = 1) -> list[Path]:
    """The files of -o out.png: out.png; with n > 1 images, out_0.png, out_1.png, ...; with turns > 1 (--then),
    out.turn1.png, out.turn2.png, ... for the turns before the last, and out.png for the last."""
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {output!r}")
    if n > 1:
        return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]
    return [out.with_name(f"{out.stem}.turn{k}{out.suffix}") for k in range(1, turns)] + [out]


def check_prompt(text: str, model_dir: Path, what: str = "prompt") -> None:
    from nextstep.model.tokenizer import TextTokenizer

    if not text.strip():
        raise ValueError(f"{what} must be a non-empty string, got {text!r}")
    n_text = len(TextTokenizer(model_dir).encode(text))
    if n_text > MAX_PROMPT_TOKENS:
        raise ValueError(f"{what} of {n_text} tokens exceeds the limit of {MAX_PROMPT_TOKENS}")


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
    """Check everything a user typed (options, prompts, output, input image) before loading the model, then run."""
    import nextstep
    from nextstep.hub import BUILTIN, resolve_model_dir
    from nextstep.model.checkpoint import check_model_dir, read_down_factor
    from nextstep.sampling import chain

    options = given_options(args)
    prompts = [args.prompt, *getattr(args, "then", [])]
    if len(prompts) > 1 and options.get("n", 1) > 1:
        raise ValueError(f"--then makes one image per turn: it cannot go with --n {options['n']}")
    if len(prompts) > 1 and args.preview_every is not None:
        raise ValueError("--preview-every writes the partial images of one turn: it cannot go with --then")
    paths = output_paths(args.output, options.get("n", 1), len(prompts))
    for path in paths:
        check_writable(path)
    model_dir = check_model_dir(resolve_model_dir(args.model))
    check_options(GenerateOptions(**options), read_down_factor(model_dir))  # unset options: valid defaults
    for prompt in prompts:
        check_prompt(prompt, model_dir)
    source = open_image(args.image, what="input image") if args.command == "edit" else None
    pipe = nextstep.load(model_dir, device=args.device, quantize=args.quantize)
    if args.preview_every is not None:  # at the size the pipeline will use (flag, source image or checkpoint)
        size = chain.run_options(pipe, args.command, source, options).size
        options["on_token"] = preview_writer(pipe, size, args.preview_every, paths)
    options = {**options, "progress": True, "model": args.model or BUILTIN}
    if args.command == "generate":
        images = chain.generate(pipe, args.prompt, **options)
    elif len(prompts) > 1:
        images = chain.edit_chain(pipe, source, prompts, source_path=args.image, **options)
    else:
        images = chain.edit(pipe, source, args.prompt, source_path=args.image, **options)
    for image, path in zip(images, paths, strict=True):
        save_png(image, path, metadata={chain.KEY: image.info[chain.KEY]})
        print(path)
    return 0


def find_source(recorded: str | None, png: Path) -> str | None:
    """The recorded source path as it was given (from the current folder), else beside the replayed PNG."""
    if recorded is None:
        return None
    for path in (Path(recorded), png.parent / recorded):
        if path.is_file():
            return str(path)
    return recorded


def run_replay(args: argparse.Namespace) -> int:
    """Re-run the turns a PNG records; exit 0 when every turn gives the recorded pixels, 1 when one differs."""
    import nextstep
    from nextstep.sampling.chain import KEY, Chain, diverged, platform_of, replay

    png = Path(args.png)
    record = open_image(png, what="image to replay").info.get(KEY)
    if record is None:
        raise ValueError(f"{str(png)!r} records no settings: only PNGs of nextstep generate or edit do")
    chain = Chain.from_json(record)
    models = sorted({str(t.model) for t in chain.turns})
    if args.model is None and (len(models) > 1 or chain.turns[0].model is None):
        raise ValueError(f"the chain was made with the model(s) {', '.join(models)}: name one with --model")
    (output,) = output_paths(args.output or str(png.with_name(f"{png.stem}.replay.png")), 1)
    check_writable(output)
    source = None
    if chain.turns[0].command == "edit":
        path = args.image or find_source(chain.source, png)
        if path is None:
            raise ValueError("the chain starts by editing an image whose path is not recorded: give it with --image")
        source = open_image(path, what="source image")
    pipe = nextstep.load(args.model or chain.turns[0].model, device=args.device, quantize=args.quantize)
    images = replay(pipe, chain, source)
    save_png(images[-1], output, metadata={KEY: images[-1].info[KEY]})
    print(output)
    k = diverged(chain, images)
    if k is not None:
        turn, here = chain.turns[k], platform_of(pipe)
        print(f"nextstep: turn {turn.turn} ({turn.prompt!r}) gave other pixels", file=sys.stderr)
        if turn.platform is not None and turn.platform != here:
            print(
                f"nextstep: it was made on {turn.platform} and replayed on {here}; pixels reproduce only on the "
                "same device kind, dtype, quantisation and torch version",
                file=sys.stderr,
            )
        return 1
    print(f"nextstep: {len(images)} turn(s) replayed to the recorded pixels", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        for path, target in FORWARDED.items():
            if tuple(argv[: len(path)]) == path:
                module, func = target.split(":")
                return getattr(importlib.import_module(module), func)(argv[len(path) :]) or 0
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # a bad command line (its one line is printed) or --help
            return e.code
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return run_replay(args) if args.command == "replay" else run_sampling(args)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, an unreadable file, a full disk
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
