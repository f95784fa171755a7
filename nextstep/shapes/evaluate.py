"""Exact GenEval-style evaluation on the synthetic shapes world: `evaluate` generates and scores a prompt
set and writes per-category accuracy and a pass/fail grid.

    nextstep eval shapes --model DIR [--split in|heldout] [--n 50]
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from nextstep.args import ArgumentParser
from nextstep.hub import resolve_model_dir
from nextstep.io import write_bytes
from nextstep.sampling.quantize import QUANTIZE
from nextstep.shapes.prompts import Prompt, build_prompts, parse_prompt, reference_scene, source_image
from nextstep.shapes.scenes import render
from nextstep.shapes.score import score_image

GenerateFn = Callable[[list[tuple[str, Image.Image | None]]], list[Image.Image]]


def reference_fn(prompts: list[Prompt], *, seed: int = 0) -> GenerateFn:
    """A generate_fn answering `prompts`, in call order, with rendered `reference_scene`s."""
    pending = iter(prompts)
    rng = random.Random(seed)

    def generate(items: list[tuple[str, Image.Image | None]]) -> list[Image.Image]:
        batch = [next(pending) for _ in items]
        return [render(reference_scene(p, rng), size=p.size) for p in batch]

    return generate


def _grid(images: list[Image.Image], passed: list[bool], *, cols: int = 8, tile: int = 128) -> Image.Image:
    border = 4
    step = tile + 2 * border
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * step, rows * step), (255, 255, 255))
    for k, (im, ok) in enumerate(zip(images, passed, strict=True)):
        x, y = (k % cols) * step, (k // cols) * step
        grid.paste((30, 200, 60) if ok else (230, 30, 30), (x, y, x + step, y + step))
        grid.paste(im.convert("RGB").resize((tile, tile)), (x + border, y + border))
    return grid


def evaluate(
    generate_fn: GenerateFn,
    prompts: list[Prompt],
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    grid_max: int = 64,
) -> dict:
    """Generate and score every prompt; write `results.json` (overall = mean of category accuracies,
    per category, per sample) and `grid.png` (up to `grid_max` outputs, round-robin over categories,
    green border = pass, red = fail) atomically into `out_dir`. Returns the results.

    `generate_fn` maps a batch of (text, input image or None) to one image each; for editing the text is
    the instruction and the image the source.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [source_image(p) for p in prompts]
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        batch = [(p.text, s) for p, s in zip(prompts[i : i + batch_size], sources[i : i + batch_size], strict=True)]
        out = generate_fn(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} images for {len(batch)} prompts")
        images += out
    scores = [score_image(im, p, source=s) for im, p, s in zip(images, prompts, sources, strict=True)]
    categories: dict[str, dict] = {}
    for p, r in zip(prompts, scores, strict=True):
        c = categories.setdefault(p.category, {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(r["correct"])
    for c in categories.values():
        c["accuracy"] = c["correct"] / c["n"]
    results = {
        "overall": float(np.mean([c["accuracy"] for c in categories.values()])),
        "accuracy": sum(r["correct"] for r in scores) / len(scores),
        "num_prompts": len(prompts),
        "categories": categories,
        "samples": [{"category": p.category, "text": p.text, **r} for p, r in zip(prompts, scores, strict=True)],
    }
    write_bytes(out_dir / "results.json", json.dumps(results, indent=1).encode())
    by_category: dict[str, list[int]] = {}
    for k, p in enumerate(prompts):
        by_category.setdefault(p.category, []).append(k)
    order = [k for group in zip(*by_category.values(), strict=False) for k in group][:grid_max]
    grid = _grid([images[k] for k in order], [scores[k]["correct"] for k in order])
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_bytes(out_dir / "grid.png", buf.getvalue())
    return results


def main(argv: list[str] | None, generate_fn_factory: Callable[..., GenerateFn]) -> int:
    """`nextstep eval shapes [--model DIR] [--split in|heldout] [--n 50] [--seed 0] [--out DIR] [--ceiling]
    [--prompt TEXT] [--quantize fp8|int8]`.

    `generate_fn_factory(model_dir, **options)` loads the model and returns a GenerateFn (see `evaluate`);
    options are the sampling overrides given (cfg, steps, edit_options={"cfg_img": ...}) and quantize, or with
    `--ceiling` only reference=<the prompts>: answer with their reference scenes through DIR's VAE.
    Prints a one-line JSON summary; full results go to `--out` (default DIR/eval/shapes_<split>, or
    ./eval/nextstep-shapes/... for the built-in model).
    """
    p = ArgumentParser(prog="nextstep eval shapes", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--split", choices=("in", "heldout"), default="in", help="prompt distribution")
    p.add_argument("--n", type=int, default=50, help="prompts per category")
    p.add_argument("--seed", type=int, default=0, help="prompt set seed")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="flow-matching head steps (default: the model's)")
    p.add_argument("--cfg-img", type=float, default=None, help="image guidance scale for edits")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help="weight-only quantisation (decoder, head)")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="score rendered ground truth passed through the model's VAE instead of samples: the best a model "
        "on that VAE can score",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="score --n samples (one batch, at most 64) of this prompt instead of the prompt set, e.g. "
        "'two red circles above a blue star'",
    )
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        p.error(f"--n and --batch-size must be >= 1, got {args.n} and {args.batch_size}")
    if (args.cfg is not None and args.cfg < 1) or (args.cfg_img is not None and args.cfg_img < 1):
        p.error(f"--cfg and --cfg-img must be >= 1, got {args.cfg} and {args.cfg_img}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    options = {k: v for k, v in (("cfg", args.cfg), ("steps", args.steps)) if v is not None}
    if args.quantize != "none":
        options["quantize"] = args.quantize
    if args.cfg_img is not None:
        options["edit_options"] = {"cfg_img": args.cfg_img}
    if args.ceiling and options:
        p.error("--ceiling samples nothing: it takes no --cfg, --steps, --cfg-img or --quantize")
    if args.prompt is not None:
        if args.ceiling:
            p.error("--prompt scores samples; --ceiling is for the prompt sets")
        if args.n > 64:
            p.error(f"--prompt takes --n <= 64 (one batch, so that every sample has its own noise), got {args.n}")
        try:
            prompts = [parse_prompt(args.prompt)] * args.n
        except ValueError as e:
            p.error(str(e))
        args.batch_size = args.n
    else:
        prompts = build_prompts(args.split, args.n, args.seed)
    name = "shapes_prompt" if args.prompt is not None else f"shapes_{args.split}" + ("_ceiling" if args.ceiling else "")
    local = args.model is not None and args.model.is_dir()  # else built in or Hub: results go under ./eval
    try:
        model_dir = resolve_model_dir(args.model)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    out = args.out or (model_dir / "eval" / name if local else Path("eval") / (args.model or model_dir).name / name)
    args.model = model_dir
    if args.ceiling:
        options["reference"] = prompts
    results = evaluate(generate_fn_factory(args.model, **options), prompts, out, batch_size=args.batch_size)
    if args.prompt is not None:
        correct = sum(r["correct"] for r in results["samples"])
        print(json.dumps({"prompt": args.prompt, "correct": correct, "n": args.n, "out": str(out)}))
        return 0
    summary = {c: round(v["accuracy"], 4) for c, v in results["categories"].items()}
    print(json.dumps({"split": args.split, "overall": round(results["overall"], 4), **summary, "out": str(out)}))
    return 0
