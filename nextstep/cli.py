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


def size_arg(text: str) -> tuple[int, int]:
    """'512x768' (width x height, like most image tools) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return h, w


def _add_sampling_args(p: argparse.ArgumentParser, *, edit: bool) -> None:
    p.add_argument("prompt", help="instruction" if edit else "text prompt")
    p.add_argument("-o", "--output", default="out.png", help="output PNG; with --n > 1, name_0.png, name_1.png, ...")
    p.add_argument("--model", default=None, help="directory, Hugging Face id[@rev] or zoo name (default: built in)")
    p.add_argument("--size", type=size_arg, default=None, help="WIDTHxHEIGHT in pixels, multiples of 16")
    p.add_argument("--steps", type=int, default=None, help="flow-matching head steps per token")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale (1 = off)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image)")
    p.add_argument("--sampler", choices=("sde", "ode", "cps"), default=None, help="head update rule")
    p.add_argument("--n", type=int, default=1, help="images to make")
    p.add_argument("--negative-prompt", default=None, help="text of the unconditional branch")
    p.add_argument(
        "--use-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="layer-normalise sampled tokens before feeding them back",
    )
    p.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None)
    p.add_argument("--cfg-normalize", action="store_true", default=None, help="norm-rescaled guidance (1.1)")
    p.add_argument("--noise-level", type=float, default=None, help="SDE/CPS noise scale (1.1)")
    p.add_argument(
        "--context-noise", type=float, default=None, help="noise std on tokens read back (image-input-noise models)"
    )
    p.add_argument("--last-step-size", type=float, default=None, help="final deterministic step (NextStep-1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--engine",
        choices=("auto", "fast", "compiled", "eager"),  # pipeline.ENGINES (not imported: no torch at parse)
        default="auto",
        help="auto: CUDA-graph engine on GPU, eager on CPU; compiled: the engine with torch.compile "
        "(fastest for large models, ~45 s to get ready at 14B)",
    )
    p.add_argument(
        "--quantize", choices=("none", "int8", "fp8"), default="none", help="weight-only quantisation (decoder, head)"
    )
    if edit:
        p.add_argument("--image", required=True, help="input image to edit")
        p.add_argument("--cfg-img", type=float, default=None, help="image guidance scale")
    else:
        p.add_argument("--positive-prompt", default=None, help="text appended to the prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextstep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
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


def _options(args: argparse.Namespace) -> dict:
    names = (
        "size",
        "steps",
        "cfg",
        "cfg_img",
        "shift",
        "sampler",
        "negative_prompt",
        "positive_prompt",
        "use_norm",
        "cfg_schedule",
        "cfg_normalize",
        "noise_level",
        "last_step_size",
        "context_noise",
    )
    opts = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return {**opts, "seed": args.seed, "n": args.n, "progress": True, "engine": args.engine}


def output_paths(output: str, n: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {output!r}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def run_sampling(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    import nextstep
    from nextstep.io import save_png

    paths = output_paths(args.output, args.n)
    source = None
    if args.command == "edit":
        try:
            source = Image.open(args.image)
            source.load()
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read input image {args.image!r}: {e}") from None
    pipe = nextstep.load(args.model, device=args.device, quantize=args.quantize)
    opts = _options(args)
    if args.command == "edit":
        images = pipe.edit(source, args.prompt, **opts)
    else:
        images = pipe.generate(args.prompt, **opts)
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
    except (ValueError, FileNotFoundError) as e:
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
