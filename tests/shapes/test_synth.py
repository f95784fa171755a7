"""Synthetic shapes generator: determinism across runs and worker counts, valid shards, held-out split."""

import hashlib
import re
from pathlib import Path

import pytest

from nextstep.data.format import placeholder_indices, read_shard
from nextstep.shapes.scenes import (
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    INVERSE,
    RELATION_PHRASES,
    SHAPES,
    Scene,
    relation_holds,
    render,
)
from nextstep.shapes.synth import main, make_sample, write_synthetic

N = 600  # in-memory samples for the distribution tests


@pytest.fixture(scope="module")
def samples():
    return [make_sample(i, seed=11) for i in range(N)]


def _digests(paths):
    return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]


def test_shards_are_byte_identical_across_runs_and_workers(tmp_path):
    one = write_synthetic(tmp_path / "a", n=50, seed=5, workers=1, shard_size=16)
    again = write_synthetic(tmp_path / "b", n=50, seed=5, workers=1, shard_size=16)
    two = write_synthetic(tmp_path / "c", n=50, seed=5, workers=2, shard_size=16)
    assert [p.name for p in one] == [
        "shapes-000000.tar",
        "shapes-000001.tar",
        "shapes-000002.tar",
        "shapes-000003.tar",
    ]
    assert _digests(one) == _digests(again) == _digests(two)
    other = write_synthetic(tmp_path / "d", n=50, seed=6, workers=1, shard_size=16)
    assert _digests(other) != _digests(one)


def test_rerun_keeps_finished_shards_and_extends(tmp_path):
    out = tmp_path / "out"
    first = write_synthetic(out, n=40, seed=5, shard_size=16)  # shards of 16, 16, 8
    fresh = write_synthetic(tmp_path / "fresh", n=50, seed=5, shard_size=16)
    # An interrupted run: one shard never published, one left as a temp file.
    first[1].unlink()
    (out / ".shapes-000001.tar.tmp999").write_bytes(b"partial")
    kept = first[0].stat().st_mtime_ns
    again = write_synthetic(out, n=50, seed=5, shard_size=16)  # and a larger n
    assert again[0].stat().st_mtime_ns == kept  # not rewritten
    assert sorted(p.name for p in out.iterdir()) == [f"shapes-00000{k}.tar" for k in range(4)] + ["synth-shapes.json"]
    # The short last shard of n=40 was rewritten to n=50's range: the same bytes as a fresh n=50 run.
    assert _digests(again) == _digests(fresh)


def test_rerun_with_other_settings_is_refused(tmp_path):
    write_synthetic(tmp_path, n=20, seed=5, shard_size=16)
    before = _digests(sorted(tmp_path.glob("*.tar")))
    with pytest.raises(ValueError, match="made with seed=5, this run has seed=6"):
        write_synthetic(tmp_path, n=20, seed=6, shard_size=16)
    with pytest.raises(ValueError, match="made with p_no_color=0.15, this run has p_no_color=0.5"):
        write_synthetic(tmp_path, n=20, seed=5, shard_size=16, p_no_color=0.5)
    with pytest.raises(ValueError, match="holds 20 samples, this run asks for n=10"):
        write_synthetic(tmp_path, n=10, seed=5, shard_size=16)
    assert _digests(sorted(tmp_path.glob("*.tar"))) == before
    with pytest.raises(SystemExit):  # the CLI says so as a usage error, no traceback
        main([str(tmp_path), "--n", "20", "--seed", "6", "--shard-size", "16"])


def test_shards_read_back_with_ground_truth(tmp_path):
    paths = write_synthetic(tmp_path, n=30, seed=2, shard_size=10)
    read = [s for p in paths for s in read_shard(p)]
    assert [s.key for s in read] == [f"shapes{i:010d}" for i in range(30)]
    for s in read:
        assert placeholder_indices(s.caption) == list(range(len(s.images)))
        assert len(s.meta["scenes"]) == len(s.images)
        assert s.meta["split"] == "train" and s.meta["kind"] in ("t2i", "edit", "interleaved")
        for image, scene in zip(s.images, s.meta["scenes"], strict=True):
            assert image.size == (128, 128)
            assert image.tobytes() == render(Scene.from_json(scene)).tobytes()


def test_sample_does_not_depend_on_neighbours():
    a = make_sample(123, seed=9)
    b = make_sample(123, seed=9)
    assert a.caption == b.caption and a.meta == b.meta
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert make_sample(124, seed=9).caption != a.caption or make_sample(124, seed=9).meta != a.meta


def test_kinds_and_vocabulary_are_covered(samples):
    kinds = {s.meta["kind"] for s in samples}
    assert kinds == {"t2i", "edit", "interleaved"}
    text = " ".join(s.caption for s in samples)
    for word in [*SHAPES, *COLORS, "small", "large", "two", "three", "four", "on the left", "at the top"]:
        assert word in text
    for phrases in RELATION_PHRASES.values():
        assert phrases[0] in text
    assert {s.meta["edit"]["op"] for s in samples if "edit" in s.meta} == {"recolor", "move", "add", "remove"}
    edits = [s for s in samples if s.meta["kind"] == "edit"]
    assert all(re.fullmatch(r"<image_0>[a-z ]+<image_1>", s.caption) for s in edits)
    counts = {len(scene["objects"]) for s in samples for scene in s.meta["scenes"]}
    assert counts >= {1, 2, 3, 4}


def test_heldout_pairs_and_relations_never_in_training(samples):
    for s in samples:
        for scene in s.meta["scenes"]:
            for o in scene["objects"]:
                assert (o["color"], o["shape"]) not in HELDOUT_PAIRS, s.caption
    # A held-out relation may not be stated in either direction, whatever words sit between the shapes.
    filler = "(?:(?:a|an|two|three|four|small|large|" + "|".join(COLORS) + r") )+"
    stated = re.compile(rf"\b(?:{'|'.join(SHAPES)})e?s? (?:to the )?(?:left of|right of|above|below) {filler}")
    assert sum(bool(stated.search(s.caption)) for s in samples) > N // 20  # the pattern does see relations
    for a, rel, b in HELDOUT_RELATIONS:
        for x, r, y in ((a, rel, b), (b, INVERSE[rel], a)):
            for phrase in RELATION_PHRASES[r]:
                pattern = re.compile(rf"\b{x}e?s? {phrase} {filler}{y}")
                assert not any(pattern.search(s.caption) for s in samples)


def _t2i_captions(p_no_color: float) -> list[str]:
    samples = [make_sample(i, seed=3, p_no_color=p_no_color) for i in range(200)]
    assert all(s.meta["p_no_color"] == p_no_color for s in samples)
    return [s.caption for s in samples if s.meta["kind"] == "t2i"]


def test_p_no_color_sets_the_share_of_color_free_captions():
    def colorless(captions):
        return sum(not any(c in caption.split() for c in COLORS) for caption in captions)

    never, always, half = _t2i_captions(0.0), _t2i_captions(1.0), _t2i_captions(0.5)
    assert colorless(never) == 0
    assert colorless(always) == len(always) > 100
    assert 0.3 * len(half) < colorless(half) < 0.7 * len(half)
    # Each sample draws its kind first, so the same samples are text-to-image at any share.
    assert len(never) == len(always) == len(half)
    with pytest.raises(ValueError, match="p_no_color must be in \\[0, 1\\], got 1.5"):
        write_synthetic(Path("unused"), n=1, seed=0, p_no_color=1.5)


def _group_relation(sample):
    """(first determiner, relation, second determiner) of a text-to-image caption "DET ... REL DET ...",
    or None."""
    words = "|".join([*COLORS, "small", "large"])
    phrases = {p: r for r, ps in RELATION_PHRASES.items() for p in ps}
    noun = rf"(a|an|two|three) (?:(?:{words}) )*[a-z]+"
    prefix = r"(?:a picture of |an image of |a drawing of |a simple scene with )?"
    rel = "|".join(phrases)
    m = re.fullmatch(rf"{prefix}{noun} ({rel}) {noun}(?: on a [a-z ]+)?<image_0>", sample.caption)
    if sample.meta["kind"] != "t2i" or m is None:
        return None
    return m.group(1), phrases[m.group(2)], m.group(3)


def test_group_relations_are_drawn_as_captioned():
    """--p-group-relation: "two red circles above a blue star" means every circle is above the star."""
    counts = {"two": 2, "three": 3}
    groups = 0
    for i in range(400):
        plain = _group_relation(make_sample(i, seed=8))
        assert plain is None or not {plain[0], plain[2]} & set(counts)  # the default stream has none
        sample = make_sample(i, seed=8, p_group_relation=1.0)
        found = _group_relation(sample)
        if found is None:
            continue
        first, relation, second = found
        assert (first in counts) != (second in counts), sample.caption  # exactly one side is a group
        groups += 1
        objs = sample.meta["scenes"][0]["objects"]
        assert len(objs) == counts.get(first, 1) + counts.get(second, 1), sample.caption
        keys = [(o["shape"], o["color"]) for o in objs]
        single = next(o for o, k in zip(objs, keys, strict=True) if keys.count(k) == 1)
        for o in objs:
            if o is single:
                continue
            a, b = (o["cx"], o["cy"]), (single["cx"], single["cy"])
            assert relation_holds(*((a, b) if first in counts else (b, a)), relation, strict=True), sample.caption
    assert groups > 20


def test_main_writes_shards(tmp_path):
    assert main([str(tmp_path), "--n", "7", "--seed", "1", "--shard-size", "4", "--prefix", "toy"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth-shapes.json", "toy-000000.tar", "toy-000001.tar"]
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--n", "0"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--n", "1", "--p-no-color", "-0.1"])
    assert not (tmp_path / "bad").exists()


def test_parse_edit_reads_every_training_instruction_and_only_those():
    """The built-in model's edit captions (synth's samples) all parse back to their Edit; other text does not."""
    import random
    from dataclasses import asdict

    from nextstep.shapes.prompts import EDIT_EXAMPLES, parse_edit
    from nextstep.shapes.scenes import edit_text
    from nextstep.shapes.synth import sample_edit

    rng = random.Random(0)
    for _ in range(200):
        _, edit, _ = sample_edit(rng)
        for variant in range(3):
            assert asdict(parse_edit(edit_text(edit, variant))) == {**asdict(edit), "size": "small"}
    assert parse_edit("  Make the RED circle blue. ").new_color == "blue"
    assert [parse_edit(e).op for e in EDIT_EXAMPLES] == ["recolor", "move", "add"]
    for text in ("make it look like van gogh", "make the red circle red", "move the red circle", "paint a cat"):
        with pytest.raises(ValueError, match="is not one the shapes model was trained on"):
            parse_edit(text)
