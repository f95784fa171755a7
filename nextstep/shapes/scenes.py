"""The synthetic shapes world: palette, shapes, held-out split, placement, rendering and the phrases for them.

The training generator (`nextstep.shapes.synth`) and the exact scorer (`nextstep.shapes.score`) both use
these definitions, so a caption, a prompt and a score always mean the same scene. Coordinates are
fractions of the image side, origin top left, y down.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# Object colors, chosen far apart in RGB (closest pair red/orange at ~107) and far (>100) from every
# background tone below, so nearest-color segmentation separates them and ignores the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (250, 235, 50),
    "purple": (150, 50, 200),
    "orange": (245, 130, 0),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "heart")
SIZES = {"small": 0.11, "large": 0.17}  # half-extent of an object's box, fraction of the image side
REGIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Held out of training: one shape per color (a diagonal of the color x shape table), so every color and
# every shape is still seen in training with the other seven partners.
HELDOUT_PAIRS = frozenset(
    {
        ("red", "heart"),
        ("green", "triangle"),
        ("blue", "star"),
        ("yellow", "ring"),
        ("purple", "square"),
        ("orange", "cross"),
        ("cyan", "circle"),
        ("white", "hexagon"),
    }
)
# Held out of training captions: these shape relations, and their converses ("square below circle").
HELDOUT_RELATIONS = frozenset(
    {
        ("circle", "above", "square"),
        ("star", "left of", "heart"),
        ("triangle", "below", "ring"),
        ("hexagon", "right of", "cross"),
    }
)
TRAIN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)

MARGIN = 0.02  # smallest gap between an object and the image border
GAP = 0.04  # smallest gap between two objects' boxes, so same-colored objects never touch
RING_WIDTH = 0.4  # ring thickness, fraction of its radius


def is_heldout_relation(shape_a: str, rel: str, shape_b: str) -> bool:
    """True if "a {shape_a} {rel} a {shape_b}" is a held-out relation, in either direction."""
    return (shape_a, rel, shape_b) in HELDOUT_RELATIONS or (
        shape_b,
        INVERSE[rel],
        shape_a,
    ) in HELDOUT_RELATIONS


def _unit(points: list[tuple[float, float]]) -> np.ndarray:
    # Center the polygon's box on 0 and scale its larger half-extent to 1, so every shape fills its box.
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return (p - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _regular(n: int, start_deg: float, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
    k = n * len(radii)
    return [
        (radii[i % len(radii)] * math.cos(a), radii[i % len(radii)] * math.sin(a))
        for i, a in ((i, math.radians(start_deg + 360 * i / k)) for i in range(k))
    ]


def _heart() -> list[tuple[float, float]]:
    ts = [2 * math.pi * i / 64 for i in range(64)]
    return [
        (
            16 * math.sin(t) ** 3,
            -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)),
        )
        for t in ts
    ]


_ARM = 0.3  # half-width of the cross's arms
POLYGONS: dict[str, np.ndarray] = {
    "square": _unit([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _unit(_regular(3, -90)),
    "star": _unit(_regular(5, -90, (1.0, 0.45))),
    "hexagon": _unit(_regular(6, 0)),
    "cross": _unit(
        [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1)]
        + [(-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)]
    ),
    "heart": _unit(_heart()),
}
# Half width and half height of each shape's box, in units of the object's half-extent.
EXTENTS = {s: tuple(np.abs(POLYGONS[s]).max(0).tolist()) if s in POLYGONS else (1.0, 1.0) for s in SHAPES}


@dataclass
class Obj:
    """One object: what it is and where its box center sits."""

    shape: str
    color: str
    size: str = "large"  # key of SIZES
    cx: float = 0.5  # box center, fraction of the image width
    cy: float = 0.5  # box center, fraction of the image height

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the drawn shape, fractions of the image side."""
        r = SIZES[self.size]
        hw, hh = EXTENTS[self.shape]
        return self.cx - r * hw, self.cy - r * hh, self.cx + r * hw, self.cy + r * hh


@dataclass
class Background:
    """A plain or lightly textured neutral background the scorer ignores."""

    color: tuple[int, int, int] = (40, 40, 40)  # base RGB
    texture: str = "plain"  # plain | noise | stripes
    amount: int = 0  # noise half-range (uniform) or stripe contrast, in 0-255 levels
    period: int = 8  # diagonal stripe period, pixels of a 128 px image
    seed: int = 0  # seed of the noise


@dataclass
class Scene:
    """Objects drawn in order over a background."""

    objects: list[Obj] = field(default_factory=list)
    background: Background = field(default_factory=Background)

    def to_json(self, size: int) -> dict:
        """JSON form with each object's box in pixels of a `size` image, as stored in sample metadata."""
        bg = self.background
        return {
            "background": {
                "color": list(bg.color),
                "texture": bg.texture,
                "amount": bg.amount,
                "period": bg.period,
                "seed": bg.seed,
            },
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "cx": o.cx,
                    "cy": o.cy,
                    "bbox": [round(v * size, 2) for v in o.box()],
                }
                for o in self.objects
            ],
        }

    @classmethod
    def from_json(cls, doc: dict) -> Scene:
        """Inverse of `to_json` (pixel boxes are derived, so they are not read)."""
        bg = dict(doc["background"], color=tuple(doc["background"]["color"]))
        objs = [Obj(o["shape"], o["color"], o["size"], o["cx"], o["cy"]) for o in doc["objects"]]
        return cls(objs, Background(**bg))


def in_region(x: float, y: float, region: str, *, strict: bool) -> bool:
    """Whether a center (x, y) lies in an absolute region.

    Strict is what the generator guarantees when a caption names the region; the scorer uses the
    looser test so a model is not failed for a few pixels.
    """
    lo, hi, mid = (0.3, 0.7, 0.06) if strict else (0.4, 0.6, 0.15)
    return {
        "left": x <= lo,
        "right": x >= hi,
        "top": y <= lo,
        "bottom": y >= hi,
        "center": abs(x - 0.5) <= mid and abs(y - 0.5) <= mid,
    }[region]


def relation_holds(a: tuple[float, float], b: tuple[float, float], rel: str, *, strict: bool) -> bool:
    """Whether center `a` is `rel` center `b` ("left of", ...): the offset along the relation's axis
    dominates the other axis (strict: by at least 0.2 and twice over, as the generator places them)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    main, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    if strict:
        return main >= 0.2 and abs(other) <= 0.5 * main
    return main > 0.05 and abs(other) < main


def overlaps(a: Obj, b: Obj) -> bool:
    """Whether two objects' boxes come closer than GAP."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax0 < bx1 + GAP and bx0 < ax1 + GAP and ay0 < by1 + GAP and by0 < ay1 + GAP


def _sample_center(
    o: Obj, region: str | None, rng: random.Random, anchor: tuple[str, float, float] | None
) -> tuple[float, float]:
    # Uniform in the box allowed by the border and region; for a relation to anchor (rel, x, y), the
    # relation's axis first, then the other axis within half that offset (the strict test), so that
    # rejection is left to overlaps.
    r = SIZES[o.size]
    hw, hh = EXTENTS[o.shape]
    x0, x1 = r * hw + MARGIN, 1 - r * hw - MARGIN
    y0, y1 = r * hh + MARGIN, 1 - r * hh - MARGIN
    if region == "left":
        x1 = min(x1, 0.3)
    elif region == "right":
        x0 = max(x0, 0.7)
    elif region == "top":
        y1 = min(y1, 0.3)
    elif region == "bottom":
        y0 = max(y0, 0.7)
    elif region == "center":
        x0, x1, y0, y1 = 0.45, 0.55, 0.45, 0.55
    if anchor is None:
        return rng.uniform(x0, x1), rng.uniform(y0, y1)
    rel, ax, ay = anchor
    if rel in ("left of", "right of"):
        x = rng.uniform(x0, min(x1, ax - 0.2)) if rel == "left of" else rng.uniform(max(x0, ax + 0.2), x1)
        half = 0.5 * abs(ax - x)
        return x, rng.uniform(max(y0, ay - half), min(y1, ay + half))
    y = rng.uniform(y0, min(y1, ay - 0.2)) if rel == "above" else rng.uniform(max(y0, ay + 0.2), y1)
    half = 0.5 * abs(ay - y)
    return rng.uniform(max(x0, ax - half), min(x1, ax + half)), y


def place(
    objs: list[Obj],
    rng: random.Random,
    *,
    fixed: list[Obj] | tuple[Obj, ...] = (),
    regions: list[str | None] | None = None,
    relations: list[tuple[int, str, int]] | tuple = (),
    tries: int = 100,
) -> bool:
    """Set the centers of `objs` by rejection sampling so none overlaps another or `fixed`, each lies
    in its region (strictly) and each (i, rel, j) of `relations` holds strictly. False if no layout found.

    A relation's subject `i` is placed after its anchor `j`; each object is the subject of at most one.
    """
    regions = regions or [None] * len(objs)
    anchor = {i: (rel, j) for i, rel, j in relations}
    order = sorted(range(len(objs)), key=lambda i: i in anchor)
    for _ in range(10):
        placed = list(fixed)
        for i in order:
            o = objs[i]
            rel, j = anchor.get(i, (None, None))
            to = None if rel is None else (rel, objs[j].cx, objs[j].cy)
            for _ in range(tries):
                o.cx, o.cy = _sample_center(o, regions[i], rng, to)
                if rel is not None and not relation_holds((o.cx, o.cy), to[1:], rel, strict=True):
                    continue  # the anchor sits too near the border for this relation
                if not any(overlaps(o, p) for p in placed):
                    break
            else:
                break
            placed.append(o)
        else:
            return True
    return False


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: int | tuple[int, ...]
) -> None:
    """Draw `shape` with box center (cx, cy) and half-extent `r`, all in pixels."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(RING_WIDTH * r)))
    else:
        draw.polygon([(cx + r * u, cy + r * v) for u, v in POLYGONS[shape]], fill=fill)


@lru_cache(maxsize=16)
def _stripe_bands(size: int, period: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((xx + yy) * 128 // size // period) % 2).astype(np.int16)[..., None]  # (size, size, 1)


def _background(bg: Background, size: int) -> Image.Image:
    base = np.empty((size, size, 3), np.int16)
    base[:] = bg.color
    if bg.texture == "noise":
        base += np.random.default_rng(bg.seed).integers(-bg.amount, bg.amount + 1, (size, size, 1), dtype=np.int16)
    elif bg.texture == "stripes":
        base += _stripe_bands(size, bg.period) * bg.amount
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, *, size: int = 128, supersample: int = 4) -> Image.Image:
    """RGB image of `scene`, drawn at `supersample` times the size and box-filtered down for antialiasing."""
    big = size * supersample
    if scene.background.texture == "plain":
        canvas = Image.new("RGB", (big, big), tuple(scene.background.color))
    else:
        canvas = _background(scene.background, size).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        draw_shape(draw, o.shape, o.cx * big, o.cy * big, SIZES[o.size] * big, COLORS[o.color])
    return canvas.reduce(supersample)


# Phrases. Index 0 of each tuple is the canonical wording that eval prompts use; training captions
# draw from all of them.
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
REGION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}
MOVE_PHRASES = {
    "left": "to the left",
    "right": "to the right",
    "top": "to the top",
    "bottom": "to the bottom",
    "center": "to the center",
}
EDIT_TEMPLATES = {
    "recolor": (
        "make the {target} {new_color}",
        "change the color of the {target} to {new_color}",
        "turn the {target} {new_color}",
    ),
    "move": ("move the {target} {dest}", "put the {target} {dest}"),
    "add": ("add {obj}", "put {obj} in the picture"),
    "remove": ("remove the {target}", "delete the {target}", "take away the {target}"),
}


def plural(shape: str) -> str:
    """English plural of a shape name."""
    return shape + ("es" if shape.endswith("s") else "s")


def noun_phrase(shape: str, *, color: str | None = None, size: str | None = None, count: int = 1) -> str:
    """ "a red circle", "an orange star", "three small green stars"."""
    head = " ".join([w for w in (size, color) if w] + [shape if count == 1 else plural(shape)])
    det = ("an" if head[0] in "aeiou" else "a") if count == 1 else NUMBERS[count]
    return f"{det} {head}"


def join_phrases(parts: list[str]) -> str:
    """ "A", "A and B", "A, B and C"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass
class Edit:
    """An editing instruction on the unique object of (color, shape) in a scene."""

    op: str  # recolor | move | add | remove
    shape: str  # target's shape (for add: the new object's)
    color: str  # target's color (for add: the new object's)
    new_color: str | None = None  # recolor: the color it becomes
    region: str | None = None  # move: where it goes (required); add: where it appears (optional)
    size: str = "small"  # add: the new object's size


def edit_text(edit: Edit, variant: int = 0) -> str:
    """The instruction for `edit` in template `variant` (0 is the canonical one)."""
    templates = EDIT_TEMPLATES[edit.op]
    target = f"{edit.color} {edit.shape}"
    obj = noun_phrase(edit.shape, color=edit.color)
    if edit.op == "add" and edit.region:
        obj = f"{obj} {REGION_PHRASES[edit.region]}"
    dest = MOVE_PHRASES.get(edit.region or "", "")
    return templates[variant % len(templates)].format(target=target, new_color=edit.new_color, obj=obj, dest=dest)


def apply_edit(scene: Scene, edit: Edit, rng: random.Random) -> Scene | None:
    """The scene after `edit` (same background, others untouched); None if a moved or added object
    finds no free place in its region."""
    objs = [Obj(o.shape, o.color, o.size, o.cx, o.cy) for o in scene.objects]
    target = next((o for o in objs if (o.color, o.shape) == (edit.color, edit.shape)), None)
    if edit.op == "recolor":
        target.color = edit.new_color
    elif edit.op == "remove":
        objs.remove(target)
    elif edit.op == "move":
        others = [o for o in objs if o is not target]
        if not place([target], rng, fixed=others, regions=[edit.region]):
            return None
    else:
        new = Obj(edit.shape, edit.color, edit.size)
        if not place([new], rng, fixed=objs, regions=[edit.region]):
            return None
        objs.append(new)
    return Scene(objs, scene.background)
