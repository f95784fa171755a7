"""Shapes eval prompts: the categories, the prompt sets (in-distribution and held-out), a parser for
free-text shapes prompts and the reference scene that answers a prompt correctly."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field, replace

from PIL import Image

from nextstep.shapes.phrasing import (
    BACKGROUND,
    BOTH,
    COLOR_LINKS,
    COUNT_WORDS,
    EXACTLY,
    LIST_JOINS,
    REGION_WORDS,
    RELATION_WORDS,
    THERE,
    WITH_WORDS,
    WORDING_PREFIXES,
)
from nextstep.shapes.scenes import (
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    INVERSE,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    Edit,
    Obj,
    Scene,
    apply_edit,
    edit_text,
    is_heldout_relation,
    noun_phrase,
    place,
    plural,
    render,
)
from nextstep.shapes.synth import random_background, sample_edit

CATEGORIES = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "color_attribution",
    "editing",
)


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

    def to_json(self) -> dict:
        """Plain JSON form (as carried in rollout meta), the inverse of `from_json`."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> Prompt:
        """The Prompt of `to_json` output, also after a JSON round trip (tuples come back as lists)."""
        objects = [
            Want(**{k: tuple(v) if k in ("near", "away") and v is not None else v for k, v in w.items()})
            for w in doc["objects"]
        ]
        relations = [(i, rel, j) for i, rel, j in doc["relations"]]
        return cls(**{**doc, "objects": objects, "relations": relations})


def source_image(prompt: Prompt) -> Image.Image | None:
    """The input image of an editing prompt, None for text-to-image prompts."""
    return None if prompt.source is None else render(Scene.from_json(prompt.source), size=prompt.size)


def _pair(rng: random.Random, pairs, *, show_color: bool, other_than: str | None = None) -> Want:
    color, shape = rng.choice([p for p in pairs if p[1] != other_than])
    return Want(shape, color if show_color else None)


def _phrase(want: Want, count: int = 1) -> str:
    return noun_phrase(want.shape, color=want.color, count=count)


def build_prompt(category: str, rng: random.Random, *, heldout: bool) -> Prompt:
    """One prompt of `category` (of CATEGORIES) in the canonical wording, drawn from `rng`; `heldout` makes it
    use a held-out color-shape pair or relation, else it never does."""
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


_COUNTS = sorted(
    [(tuple(w.split()), n) for n, ws in COUNT_WORDS.items() for w in ws] + [(("an",), 1)], key=lambda x: -len(x[0])
)
_LINKS = sorted({tuple(w.split()) for ws in COLOR_LINKS.values() for w in ws}, key=len, reverse=True)
_PREFIXES = sorted({p for p in (*WORDING_PREFIXES, *THERE.values()) if p}, key=len, reverse=True)
_RELATIONS = sorted(((w, rel) for rel, ws in RELATION_WORDS.items() for w in ws), key=lambda x: -len(x[0]))
_REGIONS = sorted(((w, r) for r, ws in REGION_WORDS.items() for w in ws), key=lambda x: -len(x[0]))
_WITH_REL = {w: rel for (rel, _), ws in WITH_WORDS.items() for w in ws}
_WITH = re.compile(rf"(?P<b>.+?) with (?P<a>.+) (?P<dir>{'|'.join(map(re.escape, _WITH_REL))})")
_JOINS = re.compile("|".join(map(re.escape, (", and ", ", ", " and ", *LIST_JOINS))))


def _noun_wants(phrase: str, text: str) -> list[Want]:
    """ "two small red circles", "a pair of stars that are blue", "3 hearts in green" -> Wants (sizes are read
    but not scored, as in the categories)."""
    words = phrase.split()
    words = words[1:] if words[:1] == [EXACTLY] else words
    count = next(((len(w), n) for w, n in _COUNTS if tuple(words[: len(w)]) == w), None)
    if count is None or len(words) == count[0]:
        raise ValueError(
            f"cannot read {phrase!r} in prompt {text!r}: a phrase starts with a, an, one, a pair of or a number"
        )
    rest, count = words[count[0] :], count[1]
    if rest[0] in SIZES:
        rest = rest[1:]
    color = None
    link = next((k for k in _LINKS if len(rest) == len(k) + 2 and tuple(rest[1:-1]) == k), None)
    if link is not None and rest[-1] in COLORS:  # "circles that are red"
        color, rest = rest[-1], rest[:1]
    elif len(rest) == 2 and rest[0] in COLORS:
        color, rest = rest[0], rest[1:]
    shapes = {(plural(sh) if count > 1 else sh): sh for sh in SHAPES}
    if len(rest) != 1 or rest[0] not in shapes:
        raise ValueError(
            f"cannot read {phrase!r} in prompt {text!r}: expected [size] [color] shape or shape that is color, with "
            f"colors {', '.join(COLORS)} and shapes {', '.join(SHAPES)} (plural after a number above one)"
        )
    return [Want(shapes[rest[0]], color) for _ in range(count)]


def _related(a: list[Want], rel: str, b: list[Want]) -> tuple[list[Want], list[tuple[int, str, int]]]:
    # Every object of `a` is `rel` every object of `b`: "two red circles above a blue star".
    return a + b, [(i, rel, len(a) + j) for i in range(len(a)) for j in range(len(b))]


def parse_prompt(text: str) -> Prompt:
    """A Prompt (category "prompt") from a shapes-domain description in any phrasing of
    `nextstep.shapes.phrasing`, scored like the eval's own: noun phrases ("a red circle", "2 stars in blue",
    "a pair of hearts that are green") joined by commas, "and", "both ... and", "as well as", "with"...,
    each optionally followed by a region ("a red circle on the left"); or two phrases joined by a relation
    ("two red circles above a blue star": every circle above the star; "a star beneath a ring", "a star with
    a ring to its left"). A leading "a picture of", "draw", "there are"... and a trailing background note are
    ignored. ValueError naming the part it cannot read."""
    clean = " ".join(text.lower().strip().rstrip(".").split())
    body = next((clean[len(p) :] for p in _PREFIXES if clean.startswith(p)), clean)
    body = BACKGROUND.sub("", body)
    relations: list[tuple[int, str, int]] = []
    with_form = _WITH.fullmatch(body)
    hit = next(((w, rel) for w, rel in _RELATIONS if f" {w} " in body), None)
    if with_form is not None:  # "B with A to its left": A left of B
        a, b = _noun_wants(with_form["a"], text), _noun_wants(with_form["b"], text)
        wants, relations = _related(a, _WITH_REL[with_form["dir"]], b)
    elif hit is not None:
        left, right = body.split(f" {hit[0]} ", 1)
        left = re.sub(r" (is|are)$", "", left)
        wants, relations = _related(_noun_wants(left, text), hit[1], _noun_wants(right, text))
    else:
        wants = []
        body = body[len(BOTH) + 1 :] if body.startswith(f"{BOTH} ") else body
        for part in _JOINS.split(body):
            words, region = next(((w, r) for w, r in _REGIONS if part.endswith(f" {w}")), ("", None))
            part = part[: len(part) - len(words) - 1] if region else part
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
    return [build_prompt(category, rng, heldout=split == "heldout") for category in CATEGORIES for _ in range(n)]


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
