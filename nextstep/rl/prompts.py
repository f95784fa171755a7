"""RL prompt sets for the built-in shapes model: scenes drawn as Prompt specs (what the reward checks) and
each worded by `nextstep.shapes.phrasing.describe` in one of the many ways people phrase it; edits as the eval's
editing category draws them, worded by any of the edit templates the model was trained on.

The "in" split never asks for a held-out color-shape pair or relation, so RL never sees a held-out
composition as a reward prompt; "heldout" asks for one in every prompt, for measuring.
"""

from __future__ import annotations

import random
from dataclasses import replace

from nextstep.shapes.phrasing import describe
from nextstep.shapes.prompts import CATEGORIES, Prompt, Want, build_prompt
from nextstep.shapes.scenes import (
    EDIT_TEMPLATES,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    INVERSE,
    REGIONS,
    RELATIONS,
    SHAPES,
    TRAIN_PAIRS,
    Edit,
    edit_text,
    is_heldout_relation,
)

# The eval's text-to-image categories, then scenes the eval does not ask for but people do.
RL_CATEGORIES = (
    *(c for c in CATEGORIES if c != "editing"),
    "counting_mixed",  # "two red circles and a blue star"
    "group_relation",  # "two red circles above a blue star"
    "regions",  # "a red circle on the left and a star at the top"
)


def _want(rng: random.Random, pairs, *, show_color: bool, shape: str | None = None, other_than=()) -> Want:
    color, sh = rng.choice([p for p in pairs if (shape is None or p[1] == shape) and p[1] not in other_than])
    return Want(sh, color if show_color else None)


def _extra(category: str, rng: random.Random, heldout: bool) -> Prompt:
    """A spec of one of the categories beyond the eval's (canonical text, re-worded by the caller)."""
    pairs = tuple(sorted(HELDOUT_PAIRS)) if heldout else TRAIN_PAIRS
    show = heldout or rng.random() < 0.5  # a held-out pair is only held out when its color is named
    if category == "counting_mixed":
        a = _want(rng, pairs, show_color=show)
        b = _want(rng, TRAIN_PAIRS, show_color=show, other_than=(a.shape,))
        objects = [a] * rng.randint(2, 3) + [b]
        return Prompt(category, "", objects if rng.random() < 0.5 else objects[::-1])
    if category == "regions":
        a = _want(rng, pairs, show_color=show)
        wants = [a] if rng.random() < 0.5 else [a, _want(rng, TRAIN_PAIRS, show_color=show, other_than=(a.shape,))]
        regions = rng.sample(REGIONS, len(wants))
        return Prompt(category, "", [replace(w, region=r) for w, r in zip(wants, regions, strict=True)])
    while True:  # group_relation: the counted group is the subject of every relation, as place() wants
        if heldout:
            sa, rel, sb = rng.choice(sorted(HELDOUT_RELATIONS))
            if rng.random() < 0.5:
                sa, rel, sb = sb, INVERSE[rel], sa
        else:
            (sa, sb), rel = rng.sample(SHAPES, 2), rng.choice(RELATIONS)
        if heldout == is_heldout_relation(sa, rel, sb):
            break
    show = rng.random() < 0.5
    a, b = (_want(rng, TRAIN_PAIRS, show_color=show, shape=s) for s in (sa, sb))
    count = rng.randint(2, 3)
    return Prompt(category, "", [a] * count + [b], [(i, rel, count) for i in range(count)])


def rl_prompts(split: str = "in", *, n: int, seed: int = 0) -> list[tuple[str, Prompt]]:
    """`n` (text, spec) pairs, categories of RL_CATEGORIES in turn, the same for the same (split, n, seed);
    spec.text is the text and spec.category its category. split "in" never uses a held-out composition."""
    if split not in ("in", "heldout"):
        raise ValueError(f"split must be 'in' or 'heldout', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"rl-prompts:{split}:{seed}")
    out = []
    heldout = split == "heldout"
    for k in range(n):
        category = RL_CATEGORIES[k % len(RL_CATEGORIES)]
        if category in CATEGORIES:
            spec = build_prompt(category, rng, heldout=heldout)
        else:
            spec = _extra(category, rng, heldout)
        text = describe(spec.objects, spec.relations, rng)
        out.append((text, replace(spec, text=text)))
    return out


def rl_edit_prompts(n: int, *, seed: int = 0) -> list[tuple[str, Prompt]]:
    """`n` (instruction, spec) edits of in-distribution scenes, the same for the same (n, seed): the eval's
    editing category of split "in" (never a held-out pair), the instruction in a random one of the templates the
    model was trained on. spec.source is the scene the input image renders (shapes.prompts.source_image)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"rl-edits:{seed}")
    out = []
    for _ in range(n):
        spec = build_prompt("editing", rng, heldout=False)
        edit = Edit(**spec.edit)
        text = edit_text(edit, rng.randrange(len(EDIT_TEMPLATES[edit.op])))
        out.append((text, replace(spec, text=text)))
    return out
