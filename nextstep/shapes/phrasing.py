"""The many ways people word a shapes scene: the phrase tables that `describe` draws from and that
`nextstep.shapes.prompts.parse_prompt` reads back, and `unknown_words`, the words of a prompt outside the
built-in model's vocabulary. What a prompt asks for (the Prompt / Want spec the scorer checks) lives in
`prompts`; this module only words it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nextstep.shapes.scenes import (
    COLORS,
    EDIT_TEMPLATES,
    INVERSE,
    MOVE_PHRASES,
    NUMBERS,
    REGION_PHRASES,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
    plural,
)
from nextstep.shapes.synth import EDIT_LINKS, PREFIXES, SCENE_LINKS

if TYPE_CHECKING:
    from nextstep.shapes.prompts import Want

# Index 0 of each tuple is the wording of the training captions and eval prompts (scenes.py); the rest are
# the other ways people say it. "a" becomes "an" before a vowel.
COUNT_WORDS = {
    1: ("a", "one", "1", "a single"),
    2: (NUMBERS[2], "2", "a pair of"),
    3: (NUMBERS[3], "3"),
    4: (NUMBERS[4], "4"),
}
EXACTLY = "exactly"  # may stand before a count above one
# The color after the noun: "a circle that is red", "two stars in blue", "a heart colored green".
COLOR_LINKS = {False: ("that is", "which is", "in", "colored"), True: ("that are", "which are", "in", "colored")}
REGION_WORDS = {
    "left": (REGION_PHRASES["left"], "on the left side", "at the left"),
    "right": (REGION_PHRASES["right"], "on the right side", "at the right"),
    "top": (REGION_PHRASES["top"], "near the top", "at the top of the image"),
    "bottom": (REGION_PHRASES["bottom"], "near the bottom", "at the bottom of the image"),
    "center": (REGION_PHRASES["center"], "in the middle", "in the centre"),
}
RELATION_WORDS = {
    "left of": (*RELATION_PHRASES["left of"], "on the left of", "on the left side of"),
    "right of": (*RELATION_PHRASES["right of"], "on the right of", "on the right side of"),
    "above": (*RELATION_PHRASES["above"], "over", "higher than", "higher up than"),
    "below": (*RELATION_PHRASES["below"], "under", "underneath", "lower than", "lower down than"),
}
# "B with A to its left": A is `rel` B. Keys are (rel, B is plural).
WITH_WORDS = {
    (rel, many): tuple(w.replace("its", "their").replace(" it", " them") if many else w for w in words)
    for rel, words in {
        "left of": ("to its left", "on its left"),
        "right of": ("to its right", "on its right"),
        "above": ("above it", "over it"),
        "below": ("below it", "beneath it", "under it"),
    }.items()
    for many in (False, True)
}
LIST_JOINS = (" as well as ", " plus ", " together with ", " along with ", " with ")  # two phrases, besides "and"
BOTH = "both"  # "both A and B"
VERBS = {False: "is", True: "are"}  # "a circle is above a star"
WORDING_PREFIXES = (*dict.fromkeys(PREFIXES), "an image showing ", "draw ", "show ", "please draw ", "generate ")
THERE = {False: "there is ", True: "there are "}  # a prefix that agrees with the first phrase
BACKGROUND = re.compile(r" on an? (dark|gray)( striped)? background$")  # the training captions' background note

# Color names people commonly use that are not in the palette: the built-in model draws some other color.
OTHER_COLORS = frozenset(
    "pink brown gray grey black violet magenta gold golden silver beige maroon navy teal turquoise lime indigo tan "
    "olive crimson lavender aqua amber peach coral salmon".split()
)


def _count_word(count: int, rng: random.Random, next_word: str) -> str:
    word = rng.choice(COUNT_WORDS[count])
    if word == "a" and next_word[0] in "aeiou":
        word = "an"
    return f"{EXACTLY} {word}" if count > 1 and word != "a pair of" and rng.random() < 0.15 else word


def noun_words(want: Want, count: int, rng: random.Random) -> str:
    """One wording of `count` copies of `want` (its region left out): "a red circle", "2 circles in red"."""
    noun = want.shape if count == 1 else plural(want.shape)
    if want.color is None:
        rest = noun
    elif rng.random() < 0.5:
        rest = f"{want.color} {noun}"
    else:
        rest = f"{noun} {rng.choice(COLOR_LINKS[count > 1])} {want.color}"
    return f"{_count_word(count, rng, rest)} {rest}"


def _groups(objects: Sequence[Want]) -> list[tuple[Want, int, int]]:
    """Runs of equal wants as (want, count, first index)."""
    runs: list[tuple[Want, int, int]] = []
    for i, w in enumerate(objects):
        if runs and runs[-1][0] == w:
            runs[-1] = (w, runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((w, 1, i))
    return runs


def _relation(objects: Sequence[Want], relations, groups) -> tuple[int, str, int]:
    """(subject group, rel, object group) when `relations` relate every member of one group to every member
    of the other, the only form a sentence can say; ValueError otherwise."""
    if len(groups) == 2:
        for s, o in ((0, 1), (1, 0)):
            subj = range(groups[s][2], groups[s][2] + groups[s][1])
            obj = range(groups[o][2], groups[o][2] + groups[o][1])
            rels = {rel for _, rel, _ in relations}
            if len(rels) == 1 and sorted((i, j) for i, _, j in relations) == [(i, j) for i in subj for j in obj]:
                return s, rels.pop(), o
    raise ValueError(f"cannot word relations {relations} between {len(objects)} objects as one sentence")


def describe(objects: Sequence[Want], relations: Sequence[tuple[int, str, int]], rng: random.Random) -> str:
    """A wording, drawn from `rng`, of exactly `objects` (equal neighbours become one counted phrase) with
    `relations` between them: a list of phrases with optional regions, or one relation between two phrases.
    `parse_prompt` reads every wording back to the same spec."""
    groups = _groups(objects)
    if any(count > max(COUNT_WORDS) for _, count, _ in groups):
        raise ValueError(f"cannot word more than {max(COUNT_WORDS)} equal objects in one phrase")
    phrases = [noun_words(w, count, rng) for w, count, _ in groups]
    if relations:
        s, rel, o = _relation(objects, relations, groups)
        if any(w.region for w, _, _ in groups):
            raise ValueError("a relation prompt takes no regions")
        many = {k: groups[k][1] > 1 for k in (s, o)}
        form = rng.randrange(4)
        if form == 0:  # "A above B", "A is above B" (then without a prefix)
            verb = f" {VERBS[many[s]]}" if rng.random() < 0.3 else ""
            body, first = f"{phrases[s]}{verb} {rng.choice(RELATION_WORDS[rel])} {phrases[o]}", s
            if verb:
                return body
        elif form == 1:  # "B below A"
            body, first = f"{phrases[o]} {rng.choice(RELATION_WORDS[INVERSE[rel]])} {phrases[s]}", o
        elif form == 2:  # "B with A above it"
            body, first = f"{phrases[o]} with {phrases[s]} {rng.choice(WITH_WORDS[rel, many[o]])}", o
        else:  # "A with B below it"
            body, first = f"{phrases[s]} with {phrases[o]} {rng.choice(WITH_WORDS[INVERSE[rel], many[s]])}", s
    else:
        parts = [
            p if w.region is None else f"{p} {rng.choice(REGION_WORDS[w.region])}"
            for p, (w, _, _) in zip(phrases, groups, strict=True)
        ]
        first = 0
        form = rng.random()
        if len(parts) == 2 and form < 0.2:
            body = f"{BOTH} {parts[0]} and {parts[1]}"
        elif len(parts) == 2 and form < 0.5:
            body = f"{parts[0]}{rng.choice(LIST_JOINS)}{parts[1]}"
        elif len(parts) > 2 and form < 0.3:
            body = ", ".join(parts[:-1]) + ", and " + parts[-1]
        else:
            body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    prefix = rng.choice(WORDING_PREFIXES) if rng.random() < 0.8 else THERE[groups[first][1] > 1]
    return prefix + body


def _known_words() -> frozenset[str]:
    # Every word of our caption and prompt templates: what the built-in model was taught (scenes.py and
    # synth.py) and the phrasings its RL prompts add (this module).
    texts = [*COLORS, *SHAPES, *map(plural, SHAPES), *SIZES, *NUMBERS.values(), "an"]
    texts += ["on a dark gray striped background"]  # synth.py's background note
    texts += [*REGION_PHRASES.values(), *MOVE_PHRASES.values(), *PREFIXES, *SCENE_LINKS, *EDIT_LINKS]
    texts += [t.format(target="", new_color="", obj="", dest="") for ts in EDIT_TEMPLATES.values() for t in ts]
    texts += [w for ws in COUNT_WORDS.values() for w in ws] + [EXACTLY, BOTH, *VERBS.values(), *THERE.values()]
    tables = (COLOR_LINKS, REGION_WORDS, RELATION_WORDS, WITH_WORDS)
    texts += [w for table in tables for ws in table.values() for w in ws]
    texts += [*LIST_JOINS, *WORDING_PREFIXES]
    return frozenset(re.findall(r"[a-z0-9]+", " ".join(texts).lower()))


KNOWN_WORDS = _known_words()


def unknown_words(text: str) -> list[str]:
    """Words of `text` the built-in model does not know, in order, once each: words outside our caption and
    prompt templates ("pentagon", "five", "big") and colors outside the palette ("pink", "gray"), which it
    would silently draw as some other color ("gray" in the templates' "gray background" is fine)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out: list[str] = []
    for k, word in enumerate(words):
        follows = words[k + 1 : k + 3]
        background = follows[:1] == ["background"] or follows == ["striped", "background"]
        if (word not in KNOWN_WORDS or (word in OTHER_COLORS and not background)) and word not in out:
            out.append(word)
    return out


def vocabulary_warning(text: str) -> str | None:
    """The one warning line `generate` prints for the built-in model, None when it knows every word."""
    words = unknown_words(text)
    if not words:
        return None
    return (
        f"the built-in model does not know {', '.join(map(repr, words))} and may draw something else instead; it "
        f"knows the colors {', '.join(COLORS)} and the shapes {', '.join(SHAPES)}"
    )
