"""How far weight-only fp8 / int8 move the model from bf16, at the same inputs and seeds.

    python bench/quant_quality.py                                           # CPU: tiny shape, built-in model
    PYTHONUNBUFFERED=1 python bench/quant_quality.py --config 14b --parts depth   # the 14B shape, on the GPU
    python bench/quant_quality.py --parts psnr,shapes --n 50 --seeds 8     # built-in model, more samples

Parts: `depth`: a random-weight model of --config (decode.py's shapes); the per-token relative error
||h_q - h|| / ||h|| of the decoder hidden state after each layer (the quantised path runs on its own
hidden states, so errors accumulate with depth as in generation), and of the flow head's velocity, alone
(bf16 conditions) and behind the quantised decoder. `psnr`: PSNR of the built-in model's images from the
same seeds against its full-precision images. `shapes`: `nextstep eval shapes` scores (in-distribution, --n
per category) of each precision at the same seeds, and their difference from full precision. The baseline
is bf16 on CUDA and float32 on the CPU (bf16 matmuls there are slow and no more exact); rows name it.
One JSON line per result: {"what", "config", "device", "number", "unit"}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import SHAPES, build_model, emit  # noqa: E402
from nextstep.model.backbone import rope_cos_sin  # noqa: E402
from nextstep.sampling.quant_kernels import Tuner  # noqa: E402
from nextstep.sampling.quantize import MODES, quantize_linear, quantize_linears  # noqa: E402

PARTS = ("depth", "psnr", "shapes")
PROMPTS = ("two red circles above a blue star", "a green square left of a yellow triangle", "three purple hexagons")


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token ||got - ref|| / ||ref|| over the last dimension, in float32: (..., d) -> (...,)."""
    got, ref = got.float(), ref.float()
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)


def quantized(module: torch.nn.Module, mode: str, tuner: Tuner) -> torch.nn.Module:
    """A copy of `module` with every linear quantised as apply_quantization does (one module at a time, so the
    bf16 model stays whole for the baseline)."""
    if isinstance(module, torch.nn.Linear):
        return quantize_linear(module, mode, tuner=tuner)
    copied = copy.deepcopy(module)
    quantize_linears(copied, mode, tuner=tuner)
    return copied


@torch.inference_mode()
def depth_errors(shape: str, device: str, tokens: int, seed: int) -> None:
    """Hidden-state error per layer depth and velocity error, fp8 and int8 against the bf16 model."""
    model = build_model(shape, "none", device=device)
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, min(cfg.vocab_size, cfg.boi), (1, tokens), generator=gen, device=device)
    x = model.embed_tokens(ids)  # (1, L, d): the same inputs for every precision
    cos, sin = rope_cos_sin(torch.arange(tokens, device=device)[None], cfg.head_dim, cfg.rope_theta, x.dtype)
    tuners = {mode: Tuner() for mode in MODES}
    hidden = {"bf16": x, **dict.fromkeys(MODES, x)}
    base = {"shape": shape, "tokens": tokens, "seed": seed, "baseline": "bf16", "weights": "random (default init)"}
    for depth, layer in enumerate(model.layers, start=1):
        hidden["bf16"] = layer(hidden["bf16"], cos, sin, None)
        for mode in MODES:
            hidden[mode] = quantized(layer, mode, tuners[mode])(hidden[mode], cos, sin, None)
            err = relative_error(hidden[mode], hidden["bf16"])[0]  # (L,)
            config = {**base, "quantize": mode, "depth": depth, "layers": cfg.num_hidden_layers}
            emit("hidden_state_relative_error_mean", config, err.mean().item(), "ratio")
            emit("hidden_state_relative_error_max", config, err.max().item(), "ratio")
    net = model.image_head.net
    noise = torch.randn(tokens, cfg.token_dim, generator=gen, device=device, dtype=x.dtype)  # (N, C*p*p)
    t = torch.rand(tokens, generator=gen, device=device, dtype=x.dtype)  # (N,)
    cond = model.image_out_projector(model.norm(hidden["bf16"]))[0]  # (N, d)
    velocity = net(noise, t, cond)
    for mode in MODES:
        q_net = quantized(net, mode, tuners[mode])
        q_cond = quantized(model.image_out_projector, mode, tuners[mode])(model.norm(hidden[mode]))[0]
        for what, got in (("head", q_net(noise, t, cond)), ("decoder_and_head", q_net(noise, t, q_cond))):
            err = relative_error(got, velocity)
            config = {**base, "quantize": mode, "quantised": what, "t": "uniform(0, 1) per token"}
            emit("velocity_relative_error_mean", config, err.mean().item(), "ratio")
            emit("velocity_relative_error_max", config, err.max().item(), "ratio")


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """dB over all pixels of uint8 images; None where they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255**2 / mse)


def image_psnr(model: str | None, device: str, seeds: int) -> None:
    """The built-in model's images from seeds 0..seeds-1 of each prompt, fp8/int8 against full precision."""
    import nextstep

    images = {}
    for mode in ("none", *MODES):
        pipe = nextstep.load(model, device=device, quantize=mode)
        images[mode] = [np.asarray(im) for p in PROMPTS for s in range(seeds) for im in pipe.generate(p, seed=s)]
        baseline = str(pipe.model.embed_tokens.weight.dtype).removeprefix("torch.")
    for mode in MODES:
        values = [psnr(a, b) for a, b in zip(images[mode], images["none"], strict=True)]
        config = {"model": model or "built in", "quantize": mode, "baseline": baseline, "images": len(values)}
        finite = [v for v in values if v is not None]
        emit("image_psnr_mean", {**config, "identical_images": len(values) - len(finite)}, np.mean(finite or [0]), "dB")
        pooled = psnr(np.stack(images[mode]), np.stack(images["none"]))
        emit("image_psnr_pooled", config, pooled, "dB")


def shapes_scores(model: str | None, n: int, seed: int, out: Path) -> None:
    """`nextstep eval shapes --split in --n N` per precision, and each quantised score minus full precision."""
    from nextstep.eval.generate import main_shapes

    scores = {}
    for mode in ("none", *MODES):
        argv = ["--n", str(n), "--seed", str(seed), "--out", str(out / mode), "--quantize", mode]
        with contextlib.redirect_stdout(sys.stderr):  # its summary line is not one of our result lines
            main_shapes(argv + (["--model", model] if model else []))
        scores[mode] = json.loads((out / mode / "results.json").read_text())
    for mode in ("none", *MODES):
        config = {"model": model or "built in", "split": "in", "n_per_category": n, "seed": seed, "quantize": mode}
        emit("shapes_overall", config, scores[mode]["overall"], "accuracy")
        if mode != "none":
            emit(
                "shapes_overall_minus_full_precision",
                config,
                scores[mode]["overall"] - scores["none"]["overall"],
                "accuracy",
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--config", choices=sorted(SHAPES), default="tiny", help="random-weight shape for `depth`")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument(
        "--tokens", type=int, default=64, help="`depth`: tokens of the random prompt (<= 64: decode kernels)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="`psnr`, `shapes`: checkpoint (default: the built-in model)")
    ap.add_argument("--seeds", type=int, default=4, help="`psnr`: seeds per prompt")
    ap.add_argument("--n", type=int, default=10, help="`shapes`: prompts per category")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS) or args.tokens < 1 or args.seeds < 1 or args.n < 1:
        ap.error(f"--parts takes {', '.join(PARTS)}; --tokens, --seeds, --n must be >= 1 (got {args.parts!r})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "depth" in parts:
        depth_errors(args.config, device, args.tokens, args.seed)
    if "psnr" in parts:
        image_psnr(args.model, device, args.seeds)
    if "shapes" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            shapes_scores(args.model, args.n, args.seed, Path(tmp))


if __name__ == "__main__":
    main()
