"""RL prompt sets: deterministic, never held out for split "in", always for "heldout", every wording parses
back to its spec, and every spec is drawable (its reference scene earns the full shapes reward); edits are the
eval's in-distribution editing category in every trained edit template, scored as the eval scores them."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from nextstep.rl.prompts import RL_CATEGORIES, rl_edit_prompts, rl_prompts
from nextstep.rl.rewards import shapes_reward
from nextstep.shapes.prompts import parse_edit, parse_prompt, reference_scene, source_image
from nextstep.shapes.scenes import EDIT_TEMPLATES, HELDOUT_PAIRS, Edit, Scene, edit_text, is_heldout_relation, render
from tests.shapes.test_phrasing import spec_key


def _heldout_parts(spec) -> int:
    pairs = sum((w.color, w.shape) in HELDOUT_PAIRS for w in spec.objects if w.color is not None)
    rels = sum(is_heldout_relation(spec.objects[i].shape, rel, spec.objects[j].shape) for i, rel, j in spec.relations)
    return pairs + rels


@pytest.mark.parametrize("split", ["in", "heldout"])
def test_every_prompt_parses_back_to_its_spec_over_many_seeds(split):
    for seed in range(25):
        for text, spec in rl_prompts(split, n=45, seed=seed):
            parsed = parse_prompt(text)
            assert spec_key(parsed.objects, parsed.relations) == spec_key(spec.objects, spec.relations), text


def test_split_in_never_uses_a_heldout_composition_and_heldout_always_does():
    for seed in range(20):
        assert [t for t, s in rl_prompts("in", n=90, seed=seed) if _heldout_parts(s)] == []
        assert [t for t, s in rl_prompts("heldout", n=90, seed=seed) if not _heldout_parts(s)] == []


def test_prompts_are_deterministic_per_seed_and_cover_the_categories():
    a = rl_prompts("in", n=len(RL_CATEGORIES) * 4, seed=3)
    assert a == rl_prompts("in", n=len(RL_CATEGORIES) * 4, seed=3)
    assert [t for t, _ in a] != [t for t, _ in rl_prompts("in", n=len(RL_CATEGORIES) * 4, seed=4)]
    assert Counter(s.category for _, s in a) == {c: 4 for c in RL_CATEGORIES}
    assert all(s.text == t and s.edit is None for t, s in a)
    assert len({t for t, _ in rl_prompts("in", n=500, seed=0)}) > 450  # wordings rarely repeat


def test_reference_scenes_of_the_specs_earn_the_full_reward():
    prompts = rl_prompts("in", n=2 * len(RL_CATEGORIES), seed=0) + rl_prompts("heldout", n=len(RL_CATEGORIES))
    rng = random.Random(0)
    images = [render(reference_scene(s, rng)) for _, s in prompts]
    rewards = shapes_reward(images, [t for t, _ in prompts], [{"prompt": s.to_json()} for _, s in prompts])
    assert rewards.tolist() == [1.0] * len(prompts)


def test_edits_are_in_distribution_in_every_trained_template_and_scored_as_the_eval_does():
    edits = rl_edit_prompts(400, seed=1)
    assert edits == rl_edit_prompts(400, seed=1) and edits != rl_edit_prompts(400, seed=2)
    variants = set()
    for text, spec in edits:
        edit = Edit(**spec.edit)
        assert spec.category == "editing" and spec.text == text and replace(parse_edit(text), size=edit.size) == edit, (
            text
        )
        variants.add((edit.op, next(v for v in range(3) if edit_text(edit, v) == text)))
        pairs = {(o.color, o.shape) for o in Scene.from_json(spec.source).objects} | {(edit.color, edit.shape)}
        if edit.new_color:
            pairs.add((edit.new_color, edit.shape))
        assert not pairs & HELDOUT_PAIRS, text
    assert variants == {(op, v) for op, templates in EDIT_TEMPLATES.items() for v in range(len(templates))}
    # The reward of an edit: the edited scene earns 1, the unedited input 0, scored against the objects parsed
    # from the input image (meta["source"]), as the eval's editing category does.
    rng = random.Random(0)
    picked = edits[:12]
    done = [render(reference_scene(s, rng)) for _, s in picked]
    sources = [source_image(s) for _, s in picked]
    meta = [{"prompt": s, "source": src} for (_, s), src in zip(picked, sources, strict=True)]
    texts = [t for t, _ in picked]
    assert shapes_reward(done, texts, meta).tolist() == [1.0] * len(picked)
    assert shapes_reward(sources, texts, meta).tolist() == [0.0] * len(picked)
    blank = [{**m, "source": render(Scene([], Scene.from_json(m["prompt"].source).background))} for m in meta]
    assert shapes_reward(done, texts, blank).tolist() == [0.0] * len(picked)  # the image is what counts


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be 'in' or 'heldout', got 'train'"):
        rl_prompts("train", n=4)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        rl_prompts("in", n=0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        rl_edit_prompts(0)
