"""Training throughput and MFU (FSDP2 bf16 on one rank) of the ~1B config at a 512px-like sequence
(76 text + 1024 image tokens) on one GPU, for torch.compile off/on x activation checkpointing off/on;
eager is the baseline, eager + AC where eager does not fit (+keep: no FSDP reshard after forward).

    python bench/train_mfu.py --out bench_train.jsonl          # GPU
    python bench/train_mfu.py --tiny --steps 2                 # CPU smoke test

One JSON line per result: {"what", "config", "device", "number", "unit"}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.nextstep_1b import ARCH_1B  # noqa: E402
from nextstep.model.checkpoint import build_model  # noqa: E402
from nextstep.train.config import ParallelConfig  # noqa: E402
from nextstep.train.metrics import peak_flops, train_flops  # noqa: E402
from nextstep.train.parallel import init_single_process_group, parallelize  # noqa: E402

TEXT_TOKENS = 76  # caption + `<|image_area|>32*32` + boi ... eoi, as a 512px t2i sample has


def make_batch(arch, batch: int, grid: int, device: torch.device, g: torch.Generator):
    """Rows of text, boi, grid*grid placeholders, eoi; random text ids and latents."""
    n_img = grid * grid
    text = torch.randint(0, min(150000, arch.boi - 10), (batch, TEXT_TOKENS - 2), generator=g)
    ids = torch.cat(
        [
            text,
            torch.full((batch, 1), arch.boi),
            torch.full((batch, n_img), arch.image_placeholder_id),
            torch.full((batch, 1), arch.eoi),
        ],
        dim=1,
    ).to(device)
    labels = ids.masked_fill(ids == arch.image_placeholder_id, -100)
    tokens = torch.randn(batch * n_img, arch.token_dim, generator=g).to(device)
    return ids, labels, tokens


def run_variant(
    arch, *, compile_: bool, ac: bool, batch: int, grid: int, steps: int, warmup: int, device, keep: bool = False
):
    torch.manual_seed(0)
    model = build_model(arch).to(device)
    # The training path: FSDP2 on a one-rank group gives bf16 compute copies of the fp32 masters.
    init_single_process_group(device)
    # keep: layers stay gathered after forward (reshard_after_forward=False), so backward does not cast them
    # again; on one GPU nothing is sharded anyway.
    cfg = ParallelConfig(compile=compile_, activation_checkpointing=ac, reshard_after_forward=not keep)
    parallelize(model, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    ids, labels, tokens = make_batch(arch, batch, grid, device, g)
    head_params = sum(p.numel() for p in model.image_head.parameters())
    seq = ids.shape[1]
    flops = train_flops(
        arch,
        head_params,
        seq_lens=[seq] * batch,
        text_targets=int((labels[:, 1:] != -100).sum()),  # rows through lm_head
        image_tokens=batch * grid * grid,
    )

    def step():
        out = model.forward_train(ids, labels, tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {
        "tokens_per_s": batch * seq / dt,
        "step_s": dt,
        "flops": flops / dt,
        "peak_mem": mem,
        "warmup_s": warm_s,
        "loss": loss,
        "seq": seq,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", type=int, default=16, help="sequences per step (16: MFU >= 40%% with compile on an H100)"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation) per variant")
    parser.add_argument("--tiny", action="store_true", help="tiny model and grid (CPU smoke test)")
    parser.add_argument(
        "--variants",
        default="eager,eager+ac,compile,compile+ac,compile+keep",
        help="comma list of eager|compile [+ac: activation checkpointing] [+keep: no reshard after forward]",
    )
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch, grid = ARCH_1B, 32
    if args.tiny:
        arch = replace(
            ARCH_1B,
            vocab_size=151680 // 64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            fm_head_dim=64,
            fm_head_layers=2,
            boi=2000,
            eoi=2001,
            image_placeholder_id=2002,
        )
        grid = 4
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(device)
    for variant in args.variants.split(","):
        unknown = set(variant.split("+")) - {"eager", "compile", "ac", "keep"}
        if unknown or variant.split("+")[0] not in ("eager", "compile"):
            parser.error(f"bad variant {variant!r}: eager|compile, then any of +ac +keep")
    sink = open(args.out, "a") if args.out else None  # noqa: SIM115
    for variant in args.variants.split(","):
        parts = set(variant.split("+"))
        try:
            r = run_variant(
                arch,
                compile_="compile" in parts,
                ac="ac" in parts,
                keep="keep" in parts,
                batch=args.batch,
                grid=grid,
                steps=args.steps,
                warmup=args.warmup,
                device=device,
            )
        except torch.OutOfMemoryError:
            r = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size = "tiny" if args.tiny else "1b"
        config = f"{size} seq{TEXT_TOKENS + grid * grid} b{args.batch} {variant} fsdp2-bf16 adamw-fused"
        rows = []
        if r is None:
            rows.append({"what": "oom", "number": 1, "unit": "bool"})
        else:
            rows += [
                {"what": "train tokens/s", "number": round(r["tokens_per_s"], 1), "unit": "tokens/s"},
                {"what": "step time", "number": round(r["step_s"], 4), "unit": "s"},
                {"what": "peak memory", "number": round(r["peak_mem"], 2), "unit": "GiB"},
                {"what": "warmup (incl. compile)", "number": round(r["warmup_s"], 1), "unit": "s"},
            ]
            if peak:
                rows.append({"what": "MFU", "number": round(r["flops"] / peak, 4), "unit": "fraction of bf16 peak"})
            rows.append({"what": "model TFLOP/s", "number": round(r["flops"] / 1e12, 1), "unit": "TFLOP/s"})
        for row in rows:
            line = json.dumps(
                {
                    "what": row["what"],
                    "config": config,
                    "device": name,
                    "number": row["number"],
                    "unit": row["unit"],
                }
            )
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
                sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
