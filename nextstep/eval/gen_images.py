"""Batch image generation for public benchmarks, in the folder layouts their scorers read.

    nextstep eval gen-images --model DIR --prompts evaluation_metadata.jsonl --format geneval --out out/geneval
    nextstep eval gen-images --model DIR --prompts dpg_prompts/ --format dpg --out out/dpg
    nextstep eval gen-images --model DIR --prompts prompts.txt --format plain --out out/plain

geneval: OUT/<00000>/metadata.jsonl (the prompt's JSON line) + OUT/<00000>/samples/<0000>.png (GenEval's
generation layout). dpg: OUT/<prompt id>.png, one grid of the n samples (DPG-Bench reads 2x2 grids);
prompts come from a folder of <id>.txt files or a text file with one prompt per line. plain: OUT/<00000>_<i>.png
plus OUT/prompts.jsonl. Finished prompts are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from nextstep.args import ArgumentParser
from nextstep.io import save_png, write_text
from nextstep.sampling.pipeline import Pipeline

FORMATS = ("geneval", "dpg", "plain")


@dataclass
class Prompt:
    key: str  # output name: zero-padded index (geneval, plain) or the DPG prompt id
    text: str
    metadata: dict  # the source JSON line (geneval) or {"prompt": text}


def read_prompts(path: Path, fmt: str) -> list[Prompt]:
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if fmt == "dpg" and path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"prompt folder {path} holds no .txt files")
        return [Prompt(f.stem, f.read_text().strip(), {"prompt": f.read_text().strip()}) for f in files]
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for i, line in enumerate(lines):
        if path.suffix == ".jsonl":
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i + 1} is not JSON: {e}") from None
            if not isinstance(meta, dict) or not str(meta.get("prompt", "")).strip():
                raise ValueError(f"{path} line {i + 1} has no 'prompt' field")
            text = meta["prompt"]
        else:
            text, meta = line.strip(), {"prompt": line.strip()}
        prompts.append(Prompt(f"{i:05d}", text, meta))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        out.paste(img, ((i % cols) * w, (i // cols) * h))
    return out


def done_marker(out: Path, fmt: str, prompt: Prompt, n: int) -> Path:
    """The file written last for a prompt: its presence means the prompt is finished."""
    if fmt == "geneval":
        return out / prompt.key / "metadata.jsonl"
    if fmt == "dpg":
        return out / f"{prompt.key}.png"
    return out / f"{prompt.key}_{n - 1}.png"


def write_outputs(out: Path, fmt: str, prompt: Prompt, images: list[Image.Image]) -> None:
    if fmt == "geneval":
        for i, img in enumerate(images):
            save_png(img, out / prompt.key / "samples" / f"{i:04d}.png")
        save_png(grid(images), out / prompt.key / "grid.png")
        write_text(out / prompt.key / "metadata.jsonl", json.dumps(prompt.metadata) + "\n")
    elif fmt == "dpg":
        save_png(grid(images), out / f"{prompt.key}.png")
    else:
        for i, img in enumerate(images):
            save_png(img, out / f"{prompt.key}_{i}.png")


def generate_all(
    pipe: Pipeline, prompts: list[Prompt], out: Path, fmt: str, *, n: int, batch_size: int, **options
) -> int:
    """Generate every unfinished prompt, batch_size prompts per call; returns how many were made."""
    todo = [p for p in prompts if not done_marker(out, fmt, p, n).is_file()]
    if fmt == "plain":
        write_text(out / "prompts.jsonl", "".join(json.dumps({"key": p.key, **p.metadata}) + "\n" for p in prompts))
    for start in tqdm(range(0, len(todo), batch_size), desc="prompts", unit="batch"):
        batch = todo[start : start + batch_size]
        images = pipe.generate([p.text for p in batch], n=n, **options)
        for k, prompt in enumerate(batch):
            write_outputs(out, fmt, prompt, images[k * n : (k + 1) * n])
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="nextstep eval gen-images", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--prompts", type=Path, required=True, help="JSONL (geneval), TXT or a folder of .txt (dpg)")
    p.add_argument("--format", choices=FORMATS, default="plain", help="output layout")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="square image side in px (default: model's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.n_per_prompt < 1 or args.batch_size < 1:
        raise ValueError(f"--n-per-prompt and --batch-size must be >= 1, got {args.n_per_prompt}, {args.batch_size}")
    prompts = read_prompts(args.prompts, args.format)
    import nextstep

    pipe = nextstep.load(args.model, device=args.device)
    options = {"seed": args.seed}
    for key in ("steps", "cfg"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.size is not None:
        options["size"] = (args.size, args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    made = generate_all(
        pipe, prompts, args.out, args.format, n=args.n_per_prompt, batch_size=args.batch_size, **options
    )
    print(
        json.dumps({"prompts": len(prompts), "generated": made, "skipped": len(prompts) - made, "out": str(args.out)})
    )
    return 0
