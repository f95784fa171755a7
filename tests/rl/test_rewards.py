"""Rewards: the exact shapes reward reads the spec from meta, brightness, a tiny local CLIP preference model,
the name / module:function resolver and the wrapper that skips failing samples."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from nextstep.rl.rewards import (
    ClipPreference,
    brightness_reward,
    resolve_reward,
    score_rewards,
    shapes_partial_reward,
    shapes_reward,
)
from nextstep.shapes.prompts import Prompt, Want, build_prompts, reference_scene
from nextstep.shapes.scenes import Background, Obj, Scene, render


@pytest.fixture(autouse=True)
def no_pool_left(monkeypatch):
    """A reward pool a test starts is shut down after it: later tests count the processes they start."""
    from nextstep.rl import rewards

    monkeypatch.setattr(rewards, "_pool", None)
    yield
    if rewards._pool is not None:
        rewards._pool.shutdown()


def _json_meta(prompt: Prompt) -> dict:
    return json.loads(json.dumps({"prompt": prompt.to_json()}))  # as carried through a rollout record


def test_prompt_json_round_trip_keeps_the_spec():
    for prompt in build_prompts("in", 3, seed=1):
        assert Prompt.from_json(_json_meta(prompt)["prompt"]) == prompt


def test_shapes_reward_scores_the_spec_in_meta_not_the_wording():
    rng = random.Random(0)
    prompts = [p for p in build_prompts("in", 2, seed=0) if p.edit is None]
    images = [render(reference_scene(p, rng)) for p in prompts]
    empty = render(Scene([], Background()))
    meta = [_json_meta(p) for p in prompts]
    got = shapes_reward([*images, empty], ["anything at all"] * (len(images) + 1), [*meta, meta[0]])
    assert got.tolist() == [1.0] * len(images) + [0.0]
    # The wording says "a red circle", the spec a blue star: the reward follows the spec.
    star = Prompt("prompt", "a red circle", [Want("star", "blue")])
    image = render(reference_scene(star, rng))
    assert shapes_reward([image], ["a red circle"], [{"prompt": star}]).tolist() == [1.0]
    assert shapes_reward(
        [image], ["a blue star"], [_json_meta(Prompt("p", "x", [Want("circle", "red")]))]
    ).tolist() == [0.0]
    with pytest.raises(ValueError, match=r"need meta\['prompt'\]"):
        shapes_reward([image], ["a blue star"], [{"text": "a blue star"}])


def test_large_batches_are_scored_in_a_process_pool_with_the_same_results(monkeypatch):
    from nextstep.rl import rewards
    from nextstep.rl.prompts import rl_prompts

    specs = [s for _, s in rl_prompts("in", n=rewards.POOL_MIN, seed=0)]
    rng = random.Random(0)
    images = [render(reference_scene(s, rng)) for s in specs[::2]] + [render(Scene([], Background()))] * 8
    images += [render(reference_scene(s, rng)) for s in specs[1::2]][: len(specs) - len(images)]  # misplaced
    meta = [{"prompt": s} for s in specs]
    texts = [s.text for s in specs]
    monkeypatch.setattr(rewards, "_workers", lambda: 2)
    pooled = shapes_reward(images, texts, meta), shapes_partial_reward(images, texts, meta)
    assert rewards._pool is not None  # the batch went to the pool
    monkeypatch.setattr(rewards, "POOL_MIN", 10**6)
    serial = shapes_reward(images, texts, meta), shapes_partial_reward(images, texts, meta)
    for a, b in zip(pooled, serial, strict=True):
        assert a.tolist() == b.tolist()
    assert 0 < pooled[0].mean() < 1 and 0 < pooled[1][pooled[0] == 0].max() < 0.5  # right, wrong, partly right


def _ignores_sigint(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    ignored = int(next(line.split()[1] for line in status if line.startswith("SigIgn:")), 16)  # bit n-1: signal n
    return bool(ignored >> (signal.SIGINT - 1) & 1)


def test_a_pool_that_lost_a_worker_scores_in_process_and_is_replaced(monkeypatch, caplog):
    """Ctrl-C reaches pool workers too (the whole process group): they ignore it. A worker killed anyway (SIGTERM,
    the OOM killer) costs the batch the pool, not its scores: it is scored in process, the next gets a new pool."""
    from nextstep.rl import rewards
    from nextstep.rl.prompts import rl_prompts

    monkeypatch.setattr(rewards, "_workers", lambda: 2)
    specs = [s for _, s in rl_prompts("in", n=rewards.POOL_MIN, seed=0)]
    rng = random.Random(0)
    images, meta = [render(reference_scene(s, rng)) for s in specs], [{"prompt": s} for s in specs]
    want = shapes_reward(images, [""] * len(images), meta)
    pool = rewards._pool
    workers = multiprocessing.active_children()
    assert pool is not None and len(workers) == 2
    deadline = time.monotonic() + 60  # a worker may still be starting (importing) after the first batch
    while not all(_ignores_sigint(w.pid) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_ignores_sigint(w.pid) for w in workers)
    for w in workers:
        os.kill(w.pid, signal.SIGINT)
    assert torch.equal(shapes_reward(images, [""] * len(images), meta), want) and rewards._pool is pool
    assert all(w.is_alive() for w in workers)
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].join()
    assert torch.equal(shapes_reward(images, [""] * len(images), meta), want)
    assert "the reward pool lost a worker" in caplog.text and rewards._pool is None
    assert torch.equal(shapes_reward(images, [""] * len(images), meta), want) and rewards._pool not in (None, pool)


def test_shapes_partial_reward_ranks_wrong_images_by_the_objects_found():
    """Wanted: two red circles above a blue star. Found objects are scored one to one on shape and color."""
    meant = Prompt("p", "", [Want("circle", "red")] * 2 + [Want("star", "blue")], [(0, "above", 2), (1, "above", 2)])
    bg = Background()

    def image(*objs):
        return render(Scene([Obj(*o) for o in objs], bg))

    images = [
        image(
            ("circle", "red", "small", 0.25, 0.2),
            ("circle", "red", "small", 0.75, 0.2),
            ("star", "blue", "small", 0.5, 0.75),
        ),
        image(
            ("circle", "red", "small", 0.25, 0.8),
            ("circle", "red", "small", 0.75, 0.8),
            ("star", "blue", "small", 0.5, 0.25),
        ),
        image(("circle", "red", "small", 0.25, 0.2), ("star", "blue", "small", 0.5, 0.75)),
        image(
            ("circle", "red", "small", 0.2, 0.2),
            ("circle", "red", "small", 0.5, 0.2),
            ("circle", "green", "small", 0.8, 0.2),
            ("star", "blue", "small", 0.5, 0.75),
        ),
        image(("circle", "blue", "small", 0.25, 0.2), ("heart", "red", "small", 0.5, 0.75)),
        image(),
    ]
    meta = [{"prompt": meant.to_json()}] * len(images)
    got = shapes_partial_reward(images, [""] * len(images), meta)
    # right; relation upside down (3 of 3 found); one circle missing (2 of 3); an extra circle (3 of 4); none.
    torch.testing.assert_close(got, torch.tensor([1.0, 0.5, 0.5 * 2 / 3, 0.5 * 3 / 4, 0.0, 0.0]))
    assert shapes_reward(images, [""] * len(images), meta).tolist() == [1.0] + [0.0] * 5
    assert resolve_reward("shapes_partial") is shapes_partial_reward


def test_brightness_reward():
    images = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 0), (255, 255, 255), (51, 51, 51))]
    torch.testing.assert_close(brightness_reward(images, [""] * 3, [{}] * 3), torch.tensor([0.0, 1.0, 0.2]))


def nan_for_stars(images, prompts, meta):
    """A module:function reward for the tests: NaN for prompts that mention a star, 1.0 otherwise."""
    return torch.tensor([math.nan if "star" in p else 1.0 for p in prompts])


def test_resolver_names_and_module_functions():
    assert resolve_reward("shapes") is shapes_reward
    assert resolve_reward("brightness") is brightness_reward
    assert resolve_reward("tests.rl.test_rewards:nan_for_stars") is nan_for_stars
    for spec, match in [
        ("sharpness", "unknown reward 'sharpness'"),
        ("tests.rl.nope:f", "reward 'tests.rl.nope:f': cannot import module 'tests.rl.nope'"),
        ("tests.rl.test_rewards:nope", "module 'tests.rl.test_rewards' has no function 'nope'"),
        ("tests.rl.test_rewards:", "unknown reward"),
        ("clip_preference", "needs the local directory"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_reward(spec)


def test_failing_samples_are_counted_and_skipped_not_the_run(caplog):
    images = [Image.new("RGB", (8, 8))] * 4
    prompts = ["a circle", "a star", "a ring", "two stars"]
    values, failed = score_rewards(nan_for_stars, images, prompts, [{}] * 4)
    assert failed == 2 and values[[0, 2]].tolist() == [1.0, 1.0] and values[[1, 3]].isnan().all()

    def raises_on_rings(images, prompts, meta):
        if any("ring" in p for p in prompts):
            raise RuntimeError("cannot score rings")
        return torch.full((len(images),), 0.5, dtype=torch.float64)

    values, failed = score_rewards(raises_on_rings, images, prompts, [{}] * 4)
    assert failed == 1 and values.dtype == torch.float32
    assert values[[0, 1, 3]].tolist() == [0.5] * 3 and values[2].isnan()
    assert "cannot score rings" in caplog.text and "'a ring'" in caplog.text
    values, failed = score_rewards(lambda i, p, m: [float("inf")] * len(i), images, prompts, [{}] * 4)
    assert failed == 4 and values.isnan().all()
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for 4 images"):
        score_rewards(lambda i, p, m: torch.zeros(len(i), 1), images, prompts, [{}] * 4)


def _tiny_clip(path):
    """A randomly initialised CLIP with a character-level tokenizer and its processor, saved to `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate([*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]}
    layers = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "max_position_embeddings": 24, **special, **layers},
        vision_config={"image_size": 32, "patch_size": 8, **layers},
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = path / "clip"
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out, model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def test_clip_preference_is_logit_scale_times_cosine_from_a_local_directory(tmp_path):
    model_dir, model, processor = _tiny_clip(tmp_path)
    reward = resolve_reward("clip_preference", model_dir=model_dir)
    assert isinstance(reward, ClipPreference)
    images = [Image.new("RGB", (48, 40), c) for c in ((200, 20, 20), (20, 20, 200), (250, 250, 250))]
    prompts = ["a red circle", "two blue stars above a ring", "a very long prompt " * 6]  # the last is truncated
    got = reward(images, prompts, [{}] * 3)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=24)
    with torch.no_grad():
        want = model(**inputs).logits_per_image.diagonal()  # logit_scale * image_embeds @ text_embeds.T
    torch.testing.assert_close(got, want)
    assert got.shape == (3,) and len(set(got.tolist())) == 3
    values, failed = score_rewards(reward, images, prompts, [{}] * 3)
    assert failed == 0 and torch.equal(values, got)


def test_clip_preference_needs_an_existing_local_model(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_reward("clip_preference", model_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a CLIP model and processor from"):
        resolve_reward("clip_preference", model_dir=tmp_path / "empty")
