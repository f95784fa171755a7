"""Phrasings of shapes scenes: every wording `describe` draws parses back to its spec, the phrasings people
use are covered and read as meant, and `unknown_words` names what the built-in model never saw."""

from __future__ import annotations

import random
import re

import pytest

from nextstep.shapes.phrasing import describe, unknown_words, vocabulary_warning
from nextstep.shapes.prompts import Want, build_prompts, parse_prompt
from nextstep.shapes.scenes import COLORS, INVERSE, SHAPES, Edit, edit_text
from nextstep.shapes.synth import sample_t2i


def spec_key(objects, relations):
    """The scene a spec asks for, independent of order and of which side a relation is said from."""

    def obj(i):
        return objects[i].shape, objects[i].color or ""

    rels = sorted(min((obj(i), rel, obj(j)), (obj(j), INVERSE[rel], obj(i))) for i, rel, j in relations)
    return sorted((w.shape, w.color or "", w.region or "") for w in objects), rels


SPECS = [
    ([Want("circle", "red")], []),
    ([Want("hexagon")] * 4, []),
    ([Want("star", "blue", "left"), Want("heart", None, "center")], []),
    ([Want("ring", "orange"), Want("cross", "white"), Want("square")], []),
    ([Want("triangle", "yellow")] * 2 + [Want("circle", "green")], []),
    ([Want("circle", "red"), Want("star", "blue")], [(0, "above", 1)]),
    ([Want("cross")] * 3 + [Want("heart", "purple")], [(0, "left of", 3), (1, "left of", 3), (2, "left of", 3)]),
    ([Want("square", "cyan"), Want("ring")], [(1, "below", 0)]),
    ([Want("star")] * 2 + [Want("square", "cyan")], [(0, "below", 2), (1, "below", 2)]),
]


@pytest.mark.parametrize("k", range(len(SPECS)))
def test_every_wording_of_a_spec_parses_back_to_it(k):
    objects, relations = SPECS[k]
    rng = random.Random(k)
    texts = {describe(objects, relations, rng) for _ in range(300)}
    assert len(texts) > 30  # many different wordings of one scene
    for text in texts:
        assert spec_key(*_parsed(text)) == spec_key(objects, relations), text


def _parsed(text):
    p = parse_prompt(text)
    return p.objects, p.relations


def test_the_ways_people_phrase_scenes_are_all_drawn():
    rng = random.Random(0)
    texts = " | ".join(describe(o, r, rng) for _ in range(400) for o, r in SPECS)
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    for pattern in [
        r"\ba pair of ",
        r"\b[234] \w+s\b",
        r"\bbeneath\b",
        r"\bhigher up than\b",
        r" with .* to its left\b",
        r" with .* (above|below|beneath|under|over) them\b",
        rf"\b({shapes})s? (that is|which is|that are|which are) ({colors})\b",
        rf"\b({shapes}) in ({colors})\b",
        rf"\b({shapes})e?s? colored ({colors})\b",
        r"\bboth .* and ",
        r"\bthere are ",
        r"\bexactly ",
        r" (as well as|plus|together with|along with) ",
        r"\b(in the middle|on the left side|at the top of the image)\b",
        r"\b(is|are) (above|below|beneath|under|over|higher than|lower than|to the left of)\b",
    ]:
        assert re.search(pattern, texts), pattern


@pytest.mark.parametrize(
    ("text", "objects", "relations"),
    [
        ("A pair of red circles.", [("circle", "red")] * 2, []),
        ("2 red circles and 3 stars", [("circle", "red")] * 2 + [("star", None)] * 3, []),
        ("a star beneath a ring", [("star", None), ("ring", None)], [(0, "below", 1)]),
        ("a blue circle is higher up than a star", [("circle", "blue"), ("star", None)], [(0, "above", 1)]),
        ("a star with a red circle to its left", [("circle", "red"), ("star", None)], [(0, "left of", 1)]),
        (
            "two hearts with a cross over them",
            [("cross", None), *[("heart", None)] * 2],
            [(0, "above", 1), (0, "above", 2)],
        ),
        ("a circle that is red", [("circle", "red")], []),
        ("a star in blue", [("star", "blue")], []),
        ("both a red circle and a blue star", [("circle", "red"), ("star", "blue")], []),
        ("there are exactly 4 crosses colored white", [("cross", "white")] * 4, []),
        ("draw one square which is green as well as a ring", [("square", "green"), ("ring", None)], []),
        ("an image of a white hexagon on a gray striped background", [("hexagon", "white")], []),
    ],
)
def test_common_phrasings_read_as_meant(text, objects, relations):
    p = parse_prompt(text)
    assert [(w.shape, w.color) for w in p.objects] == objects
    assert p.relations == relations


def test_regions_in_other_words():
    p = parse_prompt("a circle in red in the middle, a star at the top of the image and a ring on the left side")
    assert [(w.shape, w.color, w.region) for w in p.objects] == [
        ("circle", "red", "center"),
        ("star", None, "top"),
        ("ring", None, "left"),
    ]


def test_specs_that_one_sentence_cannot_say_are_refused():
    rng = random.Random(0)
    three = [Want("circle"), Want("star"), Want("ring")]
    with pytest.raises(ValueError, match="cannot word relations"):
        describe(three, [(0, "above", 1), (1, "above", 2)], rng)
    with pytest.raises(ValueError, match="cannot word relations"):
        describe(three[:2], [(0, "above", 1), (1, "left of", 0)], rng)
    with pytest.raises(ValueError, match="more than 4 equal objects"):
        describe([Want("circle")] * 5, [], rng)
    with pytest.raises(ValueError, match="takes no regions"):
        describe([Want("circle", region="left"), Want("star")], [(0, "above", 1)], rng)


def test_unknown_words_names_colors_and_words_outside_the_vocabulary():
    assert unknown_words("a pink circle") == ["pink"]
    assert unknown_words("Five brown pentagons, and a BLACK star.") == ["five", "brown", "pentagons", "black"]
    assert unknown_words("a gray circle on a gray background") == ["gray"]
    assert unknown_words("a red circle on a gray striped background") == []
    assert unknown_words("a big red circle beside a star") == ["big", "beside"]
    assert unknown_words("2 circles that are blue with a pair of stars beneath them") == []


def test_vocabulary_warning_is_one_line_naming_the_words():
    assert vocabulary_warning("2 red circles beneath a star") is None
    line = vocabulary_warning("a pink oval")
    assert "\n" not in line and line.startswith("the built-in model does not know 'pink', 'oval'")
    assert "red, green, blue" in line and "circle, square" in line


def test_eval_prompt_option_reads_other_phrasings(tmp_path, capsys):
    """`nextstep eval shapes --prompt` scores a phrasing outside the templates by its meaning."""
    import json

    from nextstep.shapes.evaluate import main
    from nextstep.shapes.prompts import Prompt, reference_scene
    from nextstep.shapes.scenes import render

    text = "a blue star with 2 circles that are red above it"
    rng = random.Random(0)

    meant = Prompt(
        "prompt", "", [Want("circle", "red")] * 2 + [Want("star", "blue")], [(0, "above", 2), (1, "above", 2)]
    )
    wrong = Prompt("prompt", "", meant.objects, [(0, "below", 2), (1, "below", 2)])

    def factory(model_dir):
        return lambda items: [render(reference_scene(p, rng)) for p in (meant, meant, meant, wrong)]

    assert main(["--model", str(tmp_path), "--prompt", text, "--n", "4"], factory) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 3


def test_every_caption_and_eval_prompt_is_known():
    """The model's own training captions and eval prompts and every phrasing drawn: no warning for them."""
    rng = random.Random(0)
    texts = [sample_t2i(rng)[1] for _ in range(300)]
    texts += [
        edit_text(Edit(op, "star", "red", "blue", "left"), v)
        for op in ("recolor", "move", "add", "remove")
        for v in range(3)
    ]
    texts += [p.text for split in ("in", "heldout") for p in build_prompts(split, 20)]
    texts += [describe(o, r, rng) for _ in range(200) for o, r in SPECS]
    assert [t for t in texts if unknown_words(t)] == []
