"""Exact GenEval-style evaluation on the synthetic shapes world: prompt sets, a pixel-level scene parser
and scorer, and `evaluate` that writes per-category accuracy and a pass/fail grid.

    nextstep eval shapes --model DIR [--split in|heldout] [--n 50]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nextstep.data.synthetic import random_background, sample_edit
from nextstep.eval.scenes import (
    COLORS,
    EXTENTS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    INVERSE,
    NUMBERS,
    POLYGONS,
    REGION_PHRASES,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    Edit,
    Obj,
    Scene,
    apply_edit,
    draw_shape,
    edit_text,
    in_region,
    is_heldout_relation,
    noun_phrase,
    place,
    plural,
    relation_holds,
    render,
)
from nextstep.hub import resolve_model_dir
from nextstep.io import write_bytes

CATEGORIES = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "color_attribution",
    "editing",
)
COLOR_TOL = 75.0  # a pixel belongs to its nearest palette color if closer than this (RGB distance)
MIN_AREA = 0.003  # smallest object, fraction of the image area (a small star covers ~0.017)
MIN_MATCH = 0.5  # shape score below which a blob's shape is "unknown"
ASPECT_WEIGHT = 2.0  # weight of the aspect-ratio mismatch in the shape score
# Circle vs hexagon is decided by the outline's 6-fold harmonic (corners at 0, 60, ... degrees as drawn):
# rendered or VAE round-tripped, circles stay below 0.025 and hexagons above 0.045 (tests/eval/test_shapes.py);
# the template score alone reads one small VAE-blurred hexagon in nine as a circle.
HEXAGON_HARMONIC = 0.035
NEAR_TOL = 0.06  # an unchanged object may drift this far (fraction of the side) in an edit
TEMPLATE = 32  # side of the normalized masks compared to the shape templates
LARGE_FROM = SIZES["small"] + SIZES["large"]  # box side splitting "small" from "large"

_PALETTE = np.array(list(COLORS.values()), np.float32)  # (K, 3)
_NAMES = list(COLORS)

GenerateFn = Callable[[list[tuple[str, Image.Image | None]]], list[Image.Image]]


@dataclass
class Detected:
    """One object parsed from an image."""

    shape: str  # best-matching shape, "unknown" below MIN_MATCH
    color: str
    cx: float  # box center, fraction of the width
    cy: float  # box center, fraction of the height
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the side
    area: int  # pixels
    match: float  # shape score of the chosen shape (see classify)
    size: str  # small | large, from the box's longer side


@dataclass
class Want:
    """One object a prompt asks for; None fields are free."""

    shape: str
    color: str | None = None
    region: str | None = None  # absolute region it must lie in (loose test)
    near: tuple[float, float] | None = None  # center it must keep (edit: unchanged objects)
    away: tuple[float, float] | None = None  # center it must leave (edit: moved object)


@dataclass
class Prompt:
    """An eval prompt and what a correct image contains: exactly `objects`, with `relations` between them.

    For editing, `text` is the instruction, `source` the input scene and the wanted objects follow from
    the objects parsed from the input image and `edit` (so `objects` stays empty).
    """

    category: str
    text: str
    objects: list[Want] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # (i, rel, j): objects[i] rel [j]
    source: dict | None = None  # editing: Scene.to_json of the input image
    edit: dict | None = None  # editing: asdict(Edit)
    size: int = 128  # image side the source is rendered at


def _components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of equal nonzero labels, via row runs and union-find: (ids, count), 0 = none."""
    h, w = labels.shape
    change = np.ones((h, w), bool)
    change[:, 1:] = labels[:, 1:] != labels[:, :-1]
    rows, starts = np.nonzero(change)
    ends = np.append(starts[1:], w)
    ends[np.append(rows[1:] != rows[:-1], True)] = w
    keep = labels[rows, starts] != 0
    rows, starts, ends = rows[keep], starts[keep], ends[keep]
    vals = labels[rows, starts].tolist()
    first = np.searchsorted(rows, np.arange(h + 1)).tolist()
    rows, starts, ends = rows.tolist(), starts.tolist(), ends.tolist()
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, h):
        i, i1, j, j1 = first[y - 1], first[y], first[y], first[y + 1]
        while i < i1 and j < j1:
            if starts[i] < ends[j] and starts[j] < ends[i] and vals[i] == vals[j]:
                parent[root(i)] = root(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    ids = np.zeros((h, w), np.int32)
    index: dict[int, int] = {}
    for k in range(len(rows)):
        ids[rows[k], starts[k] : ends[k]] = index.setdefault(root(k), len(index) + 1)
    return ids, len(index)


def _normalize(mask: np.ndarray) -> np.ndarray:
    # Stretch the blob's box to the square: rounded-off corners of small blobs then shrink the box
    # instead of distorting the outline, and the aspect ratio is scored separately.
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.BILINEAR)
    return np.asarray(small) > 127


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """(S, T, T) ideal masks of SHAPES stretched to fill the square (drawn 8x supersampled), and (S,)
    log aspect ratios (height / width) of the shapes."""
    big = TEMPLATE * 8
    masks = []
    for shape in SHAPES:
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        if shape in POLYGONS:
            hw, hh = EXTENTS[shape]
            draw.polygon([(big / 2 * (1 + u / hw), big / 2 * (1 + v / hh)) for u, v in POLYGONS[shape]], fill=255)
        else:
            draw_shape(draw, shape, big / 2, big / 2, big / 2, 255)
        masks.append(np.asarray(canvas.reduce(8)) > 127)
    aspects = np.log([EXTENTS[s][1] / EXTENTS[s][0] for s in SHAPES])
    return np.stack(masks), aspects


def hexagon_harmonic(mask: np.ndarray) -> float:
    """Cosine-6 harmonic of a blob's outline radius about its centroid, relative to the mean radius:
    about 0.09 for a drawn hexagon (corners on the harmonic's peaks), 0 for a circle."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    pad = np.pad(mask, 1)
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    by, bx = np.nonzero(mask & ~inner)  # outline: pixels with a 4-neighbour outside the blob
    radius = np.hypot(by - cy, bx - cx)
    return float((radius * np.cos(6 * np.arctan2(by - cy, bx - cx))).mean() / radius.mean())


def classify(mask: np.ndarray) -> tuple[str, float]:
    """(shape, score) of a blob cropped to its box: score = IoU with the shape's box-stretched template
    minus ASPECT_WEIGHT * |log aspect ratio difference|; "unknown" below MIN_MATCH. Between circle and
    hexagon, the outline's 6-fold harmonic decides (HEXAGON_HARMONIC)."""
    templates, aspects = _templates()
    norm = _normalize(mask)
    ious = (templates & norm).sum((1, 2)) / (templates | norm).sum((1, 2))
    scores = ious - ASPECT_WEIGHT * np.abs(np.log(mask.shape[0] / mask.shape[1]) - aspects)
    best = int(scores.argmax())
    if scores[best] < MIN_MATCH:
        return "unknown", round(float(scores[best]), 3)
    if SHAPES[best] in ("circle", "hexagon"):
        best = SHAPES.index("hexagon" if hexagon_harmonic(mask) >= HEXAGON_HARMONIC else "circle")
    return SHAPES[best], round(float(scores[best]), 3)


def parse_scene(img: Image.Image) -> list[Detected]:
    """Objects in `img`: nearest palette color per pixel (background beyond COLOR_TOL), connected
    components per color, blobs under MIN_AREA dropped, shape = best template IoU. Sorted left to right."""
    rgb = np.asarray(img.convert("RGB"), np.float32)  # (H, W, 3)
    h, w = rgb.shape[:2]
    flat = rgb.reshape(-1, 3)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; the |x|^2 term does not change the argmin, so add it after.
    d2 = flat @ (-2 * _PALETTE.T) + (_PALETTE**2).sum(-1)  # (H*W, K)
    nearest = d2.argmin(1)
    best = d2[np.arange(len(nearest)), nearest] + (flat * flat).sum(1)
    labels = np.where(best < COLOR_TOL**2, nearest + 1, 0).reshape(h, w)
    ids, count = _components(labels)
    areas = np.bincount(ids.ravel(), minlength=count + 1)
    found = []
    for k in np.nonzero(areas[1:] >= MIN_AREA * h * w)[0] + 1:
        ys, xs = np.nonzero(ids == k)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape, match = classify(ids[y0:y1, x0:x1] == k)
        found.append(
            Detected(
                shape=shape,
                color=_NAMES[labels[ys[0], xs[0]] - 1],
                cx=(x0 + x1) / 2 / w,
                cy=(y0 + y1) / 2 / h,
                box=(x0 / w, y0 / h, x1 / w, y1 / h),
                area=int(areas[k]),
                match=match,
                size="large" if max(x1 - x0, y1 - y0) / max(h, w) >= LARGE_FROM else "small",
            )
        )
    return sorted(found, key=lambda d: (d.cx, d.cy))


def _fits(d: Detected, want: Want, *, where: bool) -> bool:
    if d.shape != want.shape or (want.color is not None and d.color != want.color):
        return False
    if not where:
        return True
    if want.region is not None and not in_region(d.cx, d.cy, want.region, strict=False):
        return False
    if want.near is not None and np.hypot(d.cx - want.near[0], d.cy - want.near[1]) > NEAR_TOL:
        return False
    return want.away is None or np.hypot(d.cx - want.away[0], d.cy - want.away[1]) > NEAR_TOL


def _assign(found: list[Detected], wants: list[Want], relations, *, where: bool) -> list[int] | None:
    """found index for each want, one to one, satisfying attributes (and places and relations if `where`)."""
    chosen: list[int] = []

    def search(k: int) -> bool:
        if k == len(wants):
            return not where or all(
                relation_holds(
                    (found[chosen[i]].cx, found[chosen[i]].cy),
                    (found[chosen[j]].cx, found[chosen[j]].cy),
                    rel,
                    strict=False,
                )
                for i, rel, j in relations
            )
        for f in range(len(found)):
            if f not in chosen and _fits(found[f], wants[k], where=where):
                chosen.append(f)
                if search(k + 1):
                    return True
                chosen.pop()
        return False

    return chosen if search(0) else None


def edit_wants(before: list[Obj] | list[Detected], edit: Edit) -> list[Want] | None:
    """What the image after `edit` must hold given the objects before it: the target changed as asked,
    every other object with its shape, color and place. None if the edit does not apply: the target of
    recolor/move/remove is not there exactly once, or the object to add is there already."""
    targets = [o for o in before if (o.color, o.shape) == (edit.color, edit.shape)]
    if len(targets) != (0 if edit.op == "add" else 1):
        return None
    wants = []
    for o in before:
        if targets and o is targets[0]:
            if edit.op == "recolor":
                wants.append(Want(o.shape, edit.new_color, near=(o.cx, o.cy)))
            elif edit.op == "move":
                wants.append(Want(o.shape, o.color, region=edit.region, away=(o.cx, o.cy)))
        else:
            wants.append(Want(o.shape, o.color, near=(o.cx, o.cy)))
    if edit.op == "add":
        wants.append(Want(edit.shape, edit.color, region=edit.region))
    return wants


def source_image(prompt: Prompt) -> Image.Image | None:
    """The input image of an editing prompt, None for text-to-image prompts."""
    return None if prompt.source is None else render(Scene.from_json(prompt.source), size=prompt.size)


def score_image(img: Image.Image, prompt: Prompt, *, source: Image.Image | None = None) -> dict:
    """Score one generated image: {"correct", "reason", "objects"}.

    Correct means the parsed objects match the wanted ones one to one (shape, color where asked,
    region, relation; for editing, the asked change done and the rest unchanged relative to the objects
    parsed from `source`, or from the prompt's ground-truth source scene when `source` is None).
    """
    found = parse_scene(img)
    wants = prompt.objects
    if prompt.edit is not None:
        edit = Edit(**prompt.edit)
        before = parse_scene(source) if source is not None else Scene.from_json(prompt.source).objects
        wants = edit_wants(before, edit)
        if wants is None:
            return _result(False, f"edit target {edit.color} {edit.shape} not uniquely in the source", found)
    if len(found) != len(wants):
        return _result(False, f"expected {len(wants)} objects, found {len(found)}", found)
    if _assign(found, wants, prompt.relations, where=False) is None:
        return _result(False, "shapes or colors do not match", found)
    if _assign(found, wants, prompt.relations, where=True) is None:
        return _result(False, "positions or relations do not match", found)
    return _result(True, "ok", found)


def _result(correct: bool, reason: str, found: list[Detected]) -> dict:
    return {"correct": correct, "reason": reason, "objects": [asdict(d) for d in found]}


def _pair(rng: random.Random, pairs, *, show_color: bool, other_than: str | None = None) -> Want:
    color, shape = rng.choice([p for p in pairs if p[1] != other_than])
    return Want(shape, color if show_color else None)


def _phrase(want: Want, count: int = 1) -> str:
    return noun_phrase(want.shape, color=want.color, count=count)


def _build(category: str, rng: random.Random, heldout: bool) -> Prompt:
    pairs = tuple(sorted(HELDOUT_PAIRS)) if heldout else TRAIN_PAIRS
    maybe = heldout or rng.random() < 0.5  # color-free prompts only in-distribution (held-out needs a color)
    if category in ("single_object", "colors"):
        a = _pair(rng, pairs, show_color=category == "colors" or maybe)
        return Prompt(category, _phrase(a), [a])
    if category == "counting":
        a, count = _pair(rng, pairs, show_color=maybe), rng.randint(2, 4)
        return Prompt(category, _phrase(a, count), [a] * count)
    if category in ("two_objects", "color_attribution"):
        show = category == "color_attribution" or maybe
        a = _pair(rng, pairs, show_color=show)
        b = _pair(
            rng,
            pairs if category == "color_attribution" else TRAIN_PAIRS,
            show_color=show,
            other_than=a.shape,
        )
        return Prompt(category, f"{_phrase(a)} and {_phrase(b)}", [a, b])
    if category == "position":
        while True:
            if heldout:
                sa, rel, sb = rng.choice(sorted(HELDOUT_RELATIONS))
                if rng.random() < 0.5:
                    sa, rel, sb = sb, INVERSE[rel], sa
            else:
                sa, sb = rng.sample(SHAPES, 2)
                rel = rng.choice(RELATIONS)
            if heldout == is_heldout_relation(sa, rel, sb):
                break
        show = rng.random() < 0.5
        a = _pair(rng, [p for p in TRAIN_PAIRS if p[1] == sa], show_color=show)
        b = _pair(rng, [p for p in TRAIN_PAIRS if p[1] == sb], show_color=show)
        return Prompt(category, f"{_phrase(a)} {RELATION_PHRASES[rel][0]} {_phrase(b)}", [a, b], [(0, rel, 1)])
    ops = ("recolor", "add") if heldout else ("recolor", "move", "add", "remove")
    src, edit, _ = sample_edit(rng, new_pairs=pairs, ops=ops)
    return Prompt(category, edit_text(edit), source=src.to_json(128), edit=asdict(edit))


MAX_PROMPT_OBJECTS = 8  # a 128 px scene holds four objects comfortably; more cannot be drawn apart


def _noun_wants(phrase: str, text: str) -> list[Want]:
    """ "two small red circles" -> two Wants (sizes are read but not scored, as in the categories)."""
    words = phrase.split()
    counts = {word: k for k, word in NUMBERS.items()} | {"an": 1, "one": 1}
    if len(words) < 2 or words[0] not in counts:
        raise ValueError(f"cannot read {phrase!r} in prompt {text!r}: a phrase starts with a, an or a number")
    count, rest = counts[words[0]], words[1:]
    if rest[0] in SIZES:
        rest = rest[1:]
    color = rest[0] if len(rest) == 2 and rest[0] in COLORS else None
    noun = rest[-1] if len(rest) == 1 + (color is not None) else None
    shapes = {(plural(sh) if count > 1 else sh): sh for sh in SHAPES}
    if noun not in shapes:
        raise ValueError(
            f"cannot read {phrase!r} in prompt {text!r}: expected [size] [color] shape, with colors "
            f"{', '.join(COLORS)} and shapes {', '.join(SHAPES)} (plural after a number above one)"
        )
    return [Want(shapes[noun], color) for _ in range(count)]


def parse_prompt(text: str) -> Prompt:
    """A Prompt (category "prompt") from a shapes-domain description, scored like the eval's own:
    noun phrases joined by commas or "and", each optionally followed by a region ("a red circle on the
    left"), or two phrases joined by a relation ("two red circles above a blue star": every circle above the
    star). ValueError naming the part it cannot read."""
    clean = " ".join(text.lower().strip().rstrip(".").split())
    relations: list[tuple[int, str, int]] = []
    phrases = sorted(((ph, rel) for rel, ps in RELATION_PHRASES.items() for ph in ps), key=lambda x: -len(x[0]))
    hit = next(((ph, rel) for ph, rel in phrases if f" {ph} " in clean), None)
    if hit is not None:
        left, right = clean.split(f" {hit[0]} ", 1)
        a, b = _noun_wants(left, text), _noun_wants(right, text)
        wants = a + b
        relations = [(i, hit[1], len(a) + j) for i in range(len(a)) for j in range(len(b))]
    else:
        wants = []
        for part in clean.replace(" and ", ", ").split(", "):
            region = next((r for r, ph in REGION_PHRASES.items() if part.endswith(f" {ph}")), None)
            if region is not None:
                part = part[: -len(REGION_PHRASES[region]) - 1]
            wants += [replace(w, region=region) for w in _noun_wants(part, text)]
    if len(wants) > MAX_PROMPT_OBJECTS:
        raise ValueError(f"prompt {text!r} asks for {len(wants)} objects, at most {MAX_PROMPT_OBJECTS}")
    return Prompt("prompt", text, wants, relations)


def build_prompts(split: str, n: int, seed: int = 0) -> list[Prompt]:
    """`n` prompts per category of CATEGORIES, grouped by category. split "in" draws from the training
    distribution; "heldout" makes every prompt use a held-out color-shape pair or relation."""
    if split not in ("in", "heldout"):
        raise ValueError(f"split must be 'in' or 'heldout', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"shapes-eval:{split}:{seed}")
    return [_build(category, rng, split == "heldout") for category in CATEGORIES for _ in range(n)]


def reference_scene(prompt: Prompt, rng: random.Random) -> Scene:
    """A scene a perfect model could draw for `prompt` (free colors, sizes and places sampled from
    `rng`); rendered, it is the scorer's self-test and the eval's upper bound."""
    while True:
        if prompt.edit is not None:
            scene = apply_edit(Scene.from_json(prompt.source), Edit(**prompt.edit), rng)
            if scene is not None:
                return scene
            continue
        objs = [Obj(w.shape, w.color or rng.choice(list(COLORS)), rng.choice(tuple(SIZES))) for w in prompt.objects]
        if place(objs, rng, regions=[w.region for w in prompt.objects], relations=prompt.relations):
            return Scene(objs, random_background(rng))


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
    [--prompt TEXT]`.

    `generate_fn_factory(model_dir, **options)` loads the model and returns a GenerateFn (see `evaluate`);
    options are the sampling overrides given (cfg, steps, edit_options={"cfg_img": ...}), or with
    `--ceiling` only reference=<the prompts>: answer with their reference scenes through DIR's VAE.
    Prints a one-line JSON summary; full results go to `--out` (default DIR/eval/shapes_<split>, or
    ./eval/nextstep-shapes/... for the built-in model).
    """
    p = argparse.ArgumentParser(prog="nextstep eval shapes", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--split", choices=("in", "heldout"), default="in", help="prompt distribution")
    p.add_argument("--n", type=int, default=50, help="prompts per category")
    p.add_argument("--seed", type=int, default=0, help="prompt set seed")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="flow-matching head steps (default: the model's)")
    p.add_argument("--cfg-img", type=float, default=None, help="image guidance scale for edits")
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
    if args.cfg_img is not None:
        options["edit_options"] = {"cfg_img": args.cfg_img}
    if args.ceiling and options:
        p.error("--ceiling samples nothing: it takes no --cfg, --steps or --cfg-img")
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
