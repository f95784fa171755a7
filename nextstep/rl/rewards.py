"""Rewards for RL post-training, as plain Python: `reward(images, prompts, meta) -> (B,) float tensor`.

Named in a preset (`shapes`, `shapes_partial`, `brightness`, `clip_preference`) or given as `module:function`
(`resolve_reward`); `score_rewards` runs one so that a sample whose reward raises or is NaN is counted and
skipped, not the run. The shapes rewards parse large batches in a pool of processes (CPU-bound, ~3 ms an image).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextstep.shapes.prompts import Prompt, Want
from nextstep.shapes.score import Detected, score_image

log = logging.getLogger(__name__)

RewardFn = Callable[[list[Image.Image], list[str], list[dict]], torch.Tensor]


def _spec(meta: dict) -> Prompt:
    if "prompt" not in meta:
        raise ValueError(f"the shapes rewards need meta['prompt'] (the Prompt spec), got keys {sorted(meta)}")
    return meta["prompt"] if isinstance(meta["prompt"], Prompt) else Prompt.from_json(meta["prompt"])


def shapes_reward(images: list[Image.Image], prompts: list[str], meta: list[dict]) -> torch.Tensor:
    """1.0 where the exact shapes scorer finds the scene asked for, else 0.0. What is asked is meta[i]["prompt"]
    (a `Prompt` or its `to_json`), never a re-reading of the wording, which can be any phrasing of it; an edit is
    scored against the objects parsed from meta[i]["source"] (the input image), as the eval does."""
    return torch.tensor([float(r["correct"]) for r in _scores(images, meta)])


POOL_MIN = 32  # images from which a batch is scored in the pool: below, starting it costs more than it saves
_pool: ProcessPoolExecutor | None = None


def _workers() -> int:
    # The host's cores shared by the ranks on it, at most 16 (a 128-image batch is then ~25 ms).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _score(image: Image.Image, meta: dict) -> dict:
    return score_image(image, _spec(meta), source=meta.get("source"))


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C (which `timeout --signal=INT` and a terminal send to the whole process group) to
    the main process, which finishes its step, saves and stops; a worker would otherwise raise KeyboardInterrupt
    into the main process through its result. SIGTERM still ends a worker: the pool stops its workers with it
    when one of them dies, and a pool that lost a worker is replaced (`_scores`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _scores(images: list[Image.Image], meta: list[dict]) -> list[dict]:
    """score_image of every sample, the same results whether or not a pool (spawned once, reused) runs them.
    A batch whose pool lost a worker (a signal before its workers ignored it, SIGTERM, the OOM killer) is scored
    here; the next large batch starts a new pool."""
    global _pool
    workers = _workers()
    if len(images) >= POOL_MIN and workers >= 2:
        if _pool is None:  # spawned: forking a process that holds CUDA state is unsafe
            context = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)
        try:
            return list(_pool.map(_score, images, meta, chunksize=-(-len(images) // workers)))
        except BrokenProcessPool as e:
            log.warning("the reward pool lost a worker (%s); scoring this batch in this process", e)
            _pool.shutdown(wait=False)
            _pool = None
    return [_score(im, m) for im, m in zip(images, meta, strict=True)]


def close_pool() -> None:
    """Stop the reward pool's workers, if any (RLStep.close at the end of a run); the next large batch starts
    a new pool."""
    global _pool
    if _pool is not None:
        _pool.shutdown()
        _pool = None


def _found_share(found: list[Detected], wants: list[Want]) -> float:
    # Colored wants first: a color-free one can take any leftover of its shape, so this greedy match is maximal.
    pool = list(found)
    matched = 0
    for w in sorted(wants, key=lambda w: w.color is None):
        hit = next((d for d in pool if d.shape == w.shape and w.color in (None, d.color)), None)
        if hit is not None:
            pool.remove(hit)
            matched += 1
    return matched / max(len(wants), len(found), 1)


def shapes_partial_reward(images: list[Image.Image], prompts: list[str], meta: list[dict]) -> torch.Tensor:
    """`shapes_reward` with partial credit below it: a wrong image earns half the share of wanted objects found
    with their shape and color (one to one, out of the larger of the wanted and found counts; places and
    relations unchecked), so a group whose samples are all wrong still ranks them. Edits score 1 or 0."""
    out = []
    for r, m in zip(_scores(images, meta), meta, strict=True):
        spec = _spec(m)
        if r["correct"]:
            out.append(1.0)
        else:
            found = [Detected(**d) for d in r["objects"]]  # what score_image parsed
            out.append(0.0 if spec.edit is not None else 0.5 * _found_share(found, spec.objects))
    return torch.tensor(out)


def brightness_reward(images: list[Image.Image], prompts: list[str], meta: list[dict]) -> torch.Tensor:
    """Mean luminance in [0, 1]: a reward any model can raise, for tests and smoke runs."""
    return torch.tensor([float(np.asarray(im.convert("L"), np.float32).mean() / 255) for im in images])


class ClipPreference:
    """PickScore-style preference reward (Kirstain et al. 2023): logit_scale * cos(image, text embedding) of a
    CLIP-family model saved with `save_pretrained` in a local directory. Nothing is ever downloaded."""

    def __init__(self, model_dir: str | Path, *, device: str | torch.device = "cpu") -> None:
        path = Path(model_dir)
        if not path.is_dir():
            raise ValueError(
                f"clip_preference: model directory {str(path)!r} does not exist (a CLIP/PickScore checkpoint with "
                "its processor, saved with save_pretrained; nothing is downloaded)"
            )
        # transformers is the optional `rl` extra and slow to import: only this reward needs it.
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"clip_preference: cannot load a CLIP model and processor from {str(path)!r}: {e}"
            ) from None
        self.device = device
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str], meta: list[dict]) -> torch.Tensor:
        inputs = self.processor(
            text=prompts,
            images=[im.convert("RGB") for im in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(self.device)
        out = self.model(**inputs)  # image_embeds, text_embeds: (B, P), unit norm
        return (self.model.logit_scale.exp() * (out.image_embeds * out.text_embeds).sum(-1)).float().cpu()


REWARDS: dict[str, RewardFn] = {
    "shapes": shapes_reward,
    "shapes_partial": shapes_partial_reward,
    "brightness": brightness_reward,
}


def resolve_reward(spec: str, *, model_dir: str | Path | None = None, device: str = "cpu") -> RewardFn:
    """The reward named `spec`: shapes, shapes_partial, brightness, clip_preference (loaded from `model_dir`), or a
    `module:function` importable here. ValueError naming the spec when it cannot be resolved."""
    if spec == "clip_preference":
        if model_dir is None:
            raise ValueError("reward 'clip_preference' needs the local directory of its model")
        return ClipPreference(model_dir, device=device)
    if spec in REWARDS:
        return REWARDS[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(
            f"unknown reward {spec!r}: give one of {', '.join([*REWARDS, 'clip_preference'])} or module:function"
        )
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module!r} ({e})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module!r} has no function {name!r}")
    return fn


def score_rewards(
    fn: RewardFn, images: list[Image.Image], prompts: list[str], meta: list[dict]
) -> tuple[torch.Tensor, int]:
    """((B,) float32 rewards with NaN for skipped samples, number skipped). The batch is scored in one call;
    if that raises, sample by sample, so a failure costs only its sample. A sample is skipped when its reward
    raises or is not finite. A result that is not one number per image is the reward's bug: ValueError."""
    n = len(images)
    try:
        raw = fn(images, prompts, meta)
    except Exception as e:
        log.warning("reward %s raised on a batch of %d (%r); scoring its samples one by one", _name(fn), n, e)
        values = torch.tensor([_one(fn, im, p, m) for im, p, m in zip(images, prompts, meta, strict=True)])
    else:
        values = _checked(raw, n, fn)
    bad = ~torch.isfinite(values)
    return values.masked_fill(bad, float("nan")), int(bad.sum())


def _one(fn: RewardFn, image: Image.Image, prompt: str, meta: dict) -> float:
    try:
        raw = fn([image], [prompt], [meta])
    except Exception as e:
        log.warning("reward %s raised on prompt %r (%r): sample skipped", _name(fn), prompt, e)
        return float("nan")
    return float(_checked(raw, 1, fn)[0])


def _checked(values, n: int, fn: RewardFn) -> torch.Tensor:
    out = torch.as_tensor(values).detach().float().cpu()
    if out.shape != (n,):
        raise ValueError(f"reward {_name(fn)} returned shape {tuple(out.shape)} for {n} images; it must be ({n},)")
    return out


def _name(fn: RewardFn) -> str:
    return getattr(fn, "__qualname__", type(fn).__qualname__)
