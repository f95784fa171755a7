"""How much a shapes model reads its text versus copying its image context, in teacher-forced flow loss.

    python bench/context_reliance.py --model DIR [--baseline DIR] [--n 96]

On `n` fresh text-to-image scenes (synthetic generator, a seed apart from training) it measures the
mean flow-matching loss of the image tokens (fixed noise and t, fm_head_batch_mul draws per token) with
the true caption, with every shape word or every colour word swapped for another, with no caption, and
with the true caption but Gaussian noise of std 0.1 / 0.25 / 0.5 on the image tokens the backbone reads.
A model that follows the text loses much more when the words are wrong; a model that copies its context
loses much more when that context is noisy, and drifts when it reads its own samples. The baseline (e.g.
an earlier model) runs in the same process on the same scenes. One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re

import torch

from nextstep.data.format import Sample
from nextstep.model.checkpoint import from_pretrained
from nextstep.model.nextstep import NextStep, patchify
from nextstep.model.tokenizer import TextTokenizer
from nextstep.model.vae import load_vae, pil_to_pixels
from nextstep.shapes.scenes import COLORS, SHAPES, render
from nextstep.shapes.synth import sample_t2i
from nextstep.train.sequences import SequenceBuilder, collate, special_ids

SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")(e?s)?\b")
COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
SCENE_SEED = 12345  # the shipped data used seeds 0 and 1


def swap_words(text: str, pattern: re.Pattern, words: tuple[str, ...], seed: int) -> str:
    """Replace every match of `pattern` by another word of `words` (keeping a plural ending)."""
    rng = random.Random(seed)

    def other(m: re.Match) -> str:
        suffix = m.group(2) if m.re.groups > 1 and m.group(2) else ""
        return rng.choice([w for w in words if w != m.group(1)]) + ("s" if suffix else "")

    return pattern.sub(other, text)


def flow_loss(
    model: NextStep, tokenizer: TextTokenizer, captions: list[str], latents: torch.Tensor, context_std: float
) -> float:
    """Mean teacher-forced flow loss of the image tokens; latents (B, C, h, w) in model scale."""
    c = model.config
    ids = special_ids(tokenizer, c.boi, c.eoi, c.image_placeholder_id, c.pad_token_id_added)
    builder = SequenceBuilder(tokenizer, ids, down_factor=c.latent_patch_size, max_len=256)
    items = [
        builder(Sample(f"s{i}", cap + "<image_0>", [lat]))
        for i, (cap, lat) in enumerate(zip(captions, latents, strict=True))
    ]
    batch = collate(items, ids=ids, max_len=256, pack=False)
    target = patchify(latents, c.latent_patch_size).reshape(-1, c.token_dim)  # (N, D), placeholder order
    g = torch.Generator().manual_seed(1)
    draws = c.fm_head_batch_mul * target.shape[0]  # forward_train tiles the targets batch_mul times
    noise = torch.randn(draws, c.token_dim, generator=g)
    t = torch.sigmoid(torch.randn(draws, generator=g))
    context = target + context_std * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.forward_train(batch.input_ids, batch.labels, target, fm_noise=noise, fm_t=t, image_inputs=context)
    return float(out.im_loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory of a shapes model")
    p.add_argument("--baseline", default=None, help="a second checkpoint directory, measured the same way")
    p.add_argument("--n", type=int, default=96, help="scenes")
    args = p.parse_args()
    rng = random.Random(SCENE_SEED)
    scenes, captions = zip(*(sample_t2i(rng) for _ in range(args.n)), strict=True)
    variants = {
        "true caption": list(captions),
        "shape words swapped": [swap_words(t, SHAPE_RE, SHAPES, i) for i, t in enumerate(captions)],
        "colour words swapped": [swap_words(t, COLOR_RE, COLORS, i) for i, t in enumerate(captions)],
        "no caption": [""] * args.n,
    }
    device = f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    for role, path in (("model", args.model), ("baseline", args.baseline)):
        if path is None:
            continue
        model, tokenizer = from_pretrained(path), TextTokenizer(path)
        vae = load_vae(f"{path}/vae", dtype=torch.float32)
        with torch.no_grad():
            latents = vae.encode(torch.cat([pil_to_pixels(render(s)) for s in scenes]))
        runs = [(name, caps, 0.0) for name, caps in variants.items()]
        runs += [(f"context noise std {s}", list(captions), s) for s in (0.1, 0.25, 0.5)]
        for name, caps, std in runs:
            loss = flow_loss(model, tokenizer, caps, latents, std)
            what = f"teacher-forced flow loss, {name}"
            config = {"role": role, "path": path, "scenes": args.n}
            print(
                json.dumps({"what": what, "config": config, "device": device, "number": round(loss, 5), "unit": "mse"}),
                flush=True,
            )


if __name__ == "__main__":
    main()
