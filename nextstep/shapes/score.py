"""The exact shapes scorer: a pixel-level scene parser (palette segmentation, connected components, shape
templates) and `score_image`, which matches the parsed objects to what a prompt wants."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from nextstep.shapes.prompts import Prompt, Want
from nextstep.shapes.scenes import (
    COLORS,
    EXTENTS,
    POLYGONS,
    SHAPES,
    SIZES,
    Edit,
    Obj,
    Scene,
    draw_shape,
    in_region,
    relation_holds,
)

COLOR_TOL = 75.0  # a pixel belongs to its nearest palette color if closer than this (RGB distance)
MIN_AREA = 0.003  # smallest object, fraction of the image area (a small star covers ~0.017)
MIN_MATCH = 0.5  # shape score below which a blob's shape is "unknown"
ASPECT_WEIGHT = 2.0  # weight of the aspect-ratio mismatch in the shape score
# Circle vs hexagon is decided by the outline's 6-fold harmonic (corners at 0, 60, ... degrees as drawn):
# rendered or VAE round-tripped, circles stay below 0.025 and hexagons above 0.045 (tests/shapes/test_evaluate.py);
# the template score alone reads one small VAE-blurred hexagon in nine as a circle.
HEXAGON_HARMONIC = 0.035
NEAR_TOL = 0.06  # an unchanged object may drift this far (fraction of the side) in an edit
TEMPLATE = 32  # side of the normalized masks compared to the shape templates
LARGE_FROM = SIZES["small"] + SIZES["large"]  # box side splitting "small" from "large"

_PALETTE = np.array(list(COLORS.values()), np.float32)  # (K, 3)
_NAMES = list(COLORS)


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
