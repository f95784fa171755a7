"""The flow head as the engine runs it, bf16 against fp8/int8 weights: the fused Triton head kernels
(nextstep/sampling/head_kernels.py) and the torch head (QuantizedLinear GEMMs), at the 14B head's shape.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python bench/quant_head.py                   # bf16, fp8, int8; 2 and 8 rows
    PYTHONPATH=$PWD python bench/quant_head.py --modes bf16,fp8 --rows 2            # a quick run

Per mode, rows (batch x guidance branches) and head (fused, torch): ms of one token's head loop (`--steps`
velocity evaluations, one step's modulations, as `engine._State._head` calls them; one CUDA graph, median
of replays), that as x the roofline (the trunk's weight bytes of its own precision read once per step, over
the measured HBM copy bandwidth), and the relative error of the velocity against the unquantised bf16 head
in float32. For the fused head also the launch tuning's seconds: cold (timing every candidate, Triton
compiles included) and from the tuning cache on disk (what a second process pays). One JSON line per
result: {"what", "config", "device", "number", "unit"}. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import DEVICE, emit, hbm_bandwidth  # noqa: E402
from bench.quant_linear import time_ms  # noqa: E402
from nextstep.model.head import AdaLNMLP  # noqa: E402
from nextstep.sampling import head_kernels, quant_kernels  # noqa: E402
from nextstep.sampling.engine import head_velocity, step_modulations  # noqa: E402
from nextstep.sampling.quantize import quantize_linears  # noqa: E402

# The 14B release's head: 64-dim tokens (16 latent channels x 2 x 2 patch), 5120-dim condition, 1536 wide, 12 blocks.
TOKEN_DIM, COND_DIM, WIDTH, DEPTH = 64, 5120, 1536, 12


def trunk_bytes(net: AdaLNMLP) -> int:
    """Bytes the head reads per step: input projection, block MLPs and norms, final linear (not adaLN,
    cond and time embeddings: the engine computes every step's modulations once per token)."""
    modules = [net.input_proj, net.final_layer.linear, *(b.mlp for b in net.res_blocks)]
    modules += [b.in_ln for b in net.res_blocks]
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


def timed_tune(net: AdaLNMLP, rows: int, *, persist: bool) -> tuple[head_kernels.LaunchConfig, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    config = head_kernels.tune(net, rows, torch.device(DEVICE), persist=persist)
    torch.cuda.synchronize()
    return config, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="bf16,fp8,int8")
    parser.add_argument("--rows", default="2,8", help=f"rows per call, at most {head_kernels.MAX_ROWS}")
    parser.add_argument("--steps", type=int, default=30, help="head steps per token")
    args = parser.parse_args()
    bw = hbm_bandwidth()
    emit("hbm_copy_bandwidth", {}, bw / 1e12, "TB/s")
    torch.manual_seed(0)
    base = AdaLNMLP(TOKEN_DIM, COND_DIM, WIDTH, DEPTH).to(DEVICE, torch.bfloat16).eval()
    for p in base.parameters():  # not the zero-init adaLN: every block does work
        torch.nn.init.normal_(p, std=0.02)
    exact_net = copy.deepcopy(base).float()  # the reference: unquantised weights, float32
    t = torch.linspace(0, 1, args.steps, device=DEVICE)
    with torch.inference_mode():
        t_embed, t_embed_exact = base.time_embed(t), exact_net.time_embed(t)  # (S, W)
    for mode in args.modes.split(","):
        net = base if mode == "bf16" else copy.deepcopy(base)
        if mode != "bf16":
            quantize_linears(net, mode, tuner=quant_kernels.Tuner())
        floor_ms = trunk_bytes(net) * args.steps / bw * 1e3
        for r in (int(x) for x in args.rows.split(",")):
            rows, batch = (2, r // 2) if r % 2 == 0 else (1, r)  # guidance branches x images
            x = torch.randn(batch, TOKEN_DIM, device=DEVICE)
            cond = torch.randn(r, COND_DIM, device=DEVICE)
            with torch.inference_mode():
                mods = step_modulations(net, t_embed, cond.bfloat16())
                exact = head_velocity(exact_net, x, step_modulations(exact_net, t_embed_exact, cond)[0], rows)
            config = {"shape": "14b head", "mode": mode, "rows": r, "steps": args.steps}
            launch, cold_s = timed_tune(net, r, persist=False)
            timed_tune(net, r, persist=True)  # stores it (or finds it from an earlier run)
            _, cached_s = timed_tune(net, r, persist=True)
            emit("head_tune_cold", {**config, "launch": dataclasses.asdict(launch)}, cold_s, "s")
            emit("head_tune_from_disk_cache", config, cached_s, "s")
            fused = partial(head_kernels.velocity, config=launch)
            for name, velocity in (("fused", fused), ("torch", head_velocity)):
                cfg = {**config, "head": name}
                with torch.inference_mode():
                    err = ((velocity(net, x, mods[0], rows).float() - exact).norm() / exact.norm()).item()
                    calls = [partial(velocity, net, x, mods[i], rows) for i in range(args.steps)]
                    ms = time_ms(calls) * args.steps  # one token: every step once
                emit("head_token_ms", cfg, ms, "ms/token")
                emit("head_token_x_floor", {**cfg, "floor_ms": floor_ms}, ms / floor_ms, "x")
                emit("head_velocity_rel_error_vs_bf16_fp32", cfg, err, "rel")
        del net
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
