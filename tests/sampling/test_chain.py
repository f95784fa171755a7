"""Multi-turn editing on the built-in model: a chain equals single edits with the recorded seeds, its PNG record
replays to the same pixels, a saved result continues its chain, and a damaged record is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nextstep.assets import builtin_model_dir
from nextstep.io import open_image, save_png
from nextstep.sampling.chain import (
    KEY,
    Chain,
    chain_of,
    diverged,
    generate,
    generated,
    pixel_sha256,
    platform_of,
    replay,
)
from nextstep.sampling.options import GenerateOptions
from nextstep.sampling.pipeline import Pipeline
from nextstep.shapes.synth import make_sample

INSTRUCTIONS = ["make the star yellow", "add a blue circle on the left", "remove the white ring"]
FAST = {"steps": 2}  # few head steps: the test is about the chain, not the pictures


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    path = builtin_model_dir()
    if path is None:
        pytest.skip("this install ships no built-in model")
    return Pipeline.from_pretrained(path, device="cpu")


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return make_sample(5, seed=0).images[0]  # a 128x128 scene of the built-in model's world


@pytest.fixture(scope="module")
def turns(pipe, source) -> list[Image.Image]:
    return pipe.edit_chain(source, INSTRUCTIONS, seed=7, model="shapes", **FAST)


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_a_chain_equals_single_edits_with_the_recorded_seeds(pipe, source, turns):
    """Turn k runs with seed 7 + k on the turn before's result; the record says so, links each turn to its parent
    and holds every option the pipeline ran with (the chain passes them all explicitly, the single edits none)."""
    image = source
    for k, (instruction, got) in enumerate(zip(INSTRUCTIONS, turns, strict=True)):
        want = pipe.edit(image, instruction, seed=7 + k, **FAST)[0]
        assert same(got, want), f"turn {k + 1} differs from a single edit"
        image = want
    chain = Chain.from_json(turns[-1].info[KEY])
    assert [(t.turn, t.seed, t.prompt, t.command) for t in chain.turns] == [
        (k + 1, 7 + k, text, "edit") for k, text in enumerate(INSTRUCTIONS)
    ]
    assert chain.turns[0].parent_sha256 == pixel_sha256(source)
    assert [t.sha256 for t in chain.turns] == [pixel_sha256(im) for im in turns]
    assert chain.turns[1].parent_sha256 == chain.turns[0].sha256
    options = chain.turns[2].options
    assert (options["steps"], options["size"], options["cfg_img"]) == (2, [128, 128], pipe.edit_defaults["cfg_img"])
    assert set(options) == set(GenerateOptions.__dataclass_fields__) - {"seed", "progress"}
    assert Chain.from_json(turns[0].info[KEY]).turns == chain.turns[:1]  # each image records its chain so far


def test_the_chain_replays_from_its_png_to_identical_pixels(pipe, source, turns, tmp_path):
    save_png(turns[-1], tmp_path / "out.png", metadata={KEY: turns[-1].info[KEY]})
    chain = Chain.from_json(open_image(tmp_path / "out.png").info[KEY])
    again = replay(pipe, chain, source)
    assert diverged(chain, again) is None
    assert all(same(a, b) for a, b in zip(again, turns, strict=True))
    with pytest.raises(ValueError, match="other pixels .* than the one the chain started from"):
        replay(pipe, chain, turns[0])
    with pytest.raises(ValueError, match="starts by editing an image .*: give it"):
        replay(pipe, chain)


def test_a_saved_result_continues_its_chain(pipe, turns, tmp_path):
    """Editing turn 1's PNG again with turn 2's seed gives turn 2 and its very record; changed pixels start anew."""
    save_png(turns[0], tmp_path / "t1.png", metadata={KEY: turns[0].info[KEY]})
    reopened = open_image(tmp_path / "t1.png")
    (second,) = pipe.edit_chain(reopened, INSTRUCTIONS[1:2], seed=8, model="shapes", **FAST)
    assert same(second, turns[1]) and second.info[KEY] == turns[1].info[KEY]
    touched = reopened.copy()
    touched.putpixel((0, 0), (1, 2, 3))
    assert chain_of(reopened) is not None and chain_of(touched) is None


def test_generated_images_record_their_index_and_replay(pipe):
    images = generate(pipe, "two red circles above a blue star", n=2, seed=3, model="shapes", **FAST)
    chain = Chain.from_json(images[1].info[KEY])
    (turn,) = chain.turns
    assert (turn.command, turn.turn, turn.index, turn.seed, turn.parent_sha256) == ("generate", 0, 1, 3, None)
    assert turn.platform == platform_of(pipe)
    assert turn.platform.startswith("cpu ") and ", float32, torch " in turn.platform
    assert same(replay(pipe, chain)[0], images[1])


def test_a_chain_takes_one_image_per_turn(pipe, source):
    with pytest.raises(ValueError, match="one image per turn, got n=2"):
        pipe.edit_chain(source, INSTRUCTIONS, n=2)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        pipe.edit_chain(source, "make the star yellow")


def _record() -> dict:
    image = generated(Image.new("RGB", (32, 32)), "a cat", GenerateOptions(size=(32, 32)), model="m")
    return json.loads(image.info[KEY])


def _edit_turn(raw: dict) -> dict:
    return {**raw["turns"][0], "command": "edit", "turn": 1, "parent_sha256": raw["turns"][0]["sha256"]}


BAD = [
    (lambda r: {**r, "version": 2}, "version 2 is not 1"),
    (lambda r: {**r, "turns": []}, "no turns"),
    (lambda r: r["turns"][0]["options"].update(cfgg=1.0), "unknown option 'cfgg'"),
    (lambda r: r["turns"][0]["options"].update(steps=2.5), "steps must be of type int, got 2.5"),
    (lambda r: r["turns"][0]["options"].update(cfg=float("nan")), "cfg must be > 0"),
    (lambda r: r["turns"][0].update(seed=None), "bad seed None"),
    (lambda r: r["turns"][0].update(index=1), "bad seed 0 or index 1"),
    (lambda r: r["turns"][0].update(colour="red"), "unexpected keyword argument 'colour'"),
    (lambda r: r["turns"][0].update(platform=["cpu"]), "platform of the wrong type"),
    (lambda r: r["turns"].append({**_edit_turn(r), "parent_sha256": "0" * 64}), "turn 1 does not start from"),
    (lambda r: r["turns"].append({**_edit_turn(r), "turn": 3}), "turn 1 does not start from"),
    (lambda r: r["turns"].append(r["turns"][0]), "a 'generate' turn numbered 0 cannot come there"),
]


@pytest.mark.parametrize("damage, message", BAD, ids=[b[1][:30] for b in BAD])
def test_a_damaged_record_is_refused_by_name(damage, message):
    raw = _record()
    Chain.from_json(json.dumps(raw))  # the undamaged record parses
    raw = damage(raw) or raw
    with pytest.raises(ValueError, match=f"bad nextstep record: .*{message}"):
        Chain.from_json(json.dumps(raw))
    image = Image.new("RGB", (32, 32))
    image.info[KEY] = json.dumps(raw)
    assert chain_of(image) is None  # an edit of it starts a new chain
