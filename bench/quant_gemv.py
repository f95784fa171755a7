"""Our fused weight-only fp8/int8 linear (nextstep/sampling/quant_kernels.py) against bf16 F.linear at the
14B decoder's and flow head's shapes and decode rows 1-64.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python bench/quant_gemv.py                          # all (~3 min)
    PYTHONPATH=$PWD python bench/quant_gemv.py --rows 2 --shapes gate_up,down --modes fp8   # a quick run

Per shape, rows and mode: ms per call (median of CUDA-graph replays; the graph cycles through enough copies
of the weight that every call reads it from HBM, not L2), that time as x its own precision's floor (weight
bytes / measured HBM copy bandwidth), the relative error against float32 with the unquantised weights
(quantisation included) and against float32 with the dequantised weights (the kernel's own error), and the
first call's seconds (Triton compiles + tuning, what a cold process pays). One JSON line per result:
{"what", "config", "device", "number", "unit"}. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.quant_linear import BYTES_PER_WEIGHT, DEVICE, SHAPES, emit, hbm_bandwidth, time_ms  # noqa: E402
from nextstep.sampling import quant_kernels  # noqa: E402
from nextstep.sampling.quantize import QuantizedLinear, dequantize_weight, quantize_linear  # noqa: E402

# The head's other linears beside its 1536 x 1536 MLP: adaLN modulation (3 x 1536 out) and cond_embed.
ALL_SHAPES = [*SHAPES, ("head_adaln", 1536, 4608), ("head_cond", 5120, 1536)]
ROTATE_BYTES = 256 * 2**20  # weight copies cycled per graph: several times the H100/H200 L2 (50-60 MB)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,16,32,64", help="rows per call (batch x guidance branches)")
    parser.add_argument("--modes", default="bf16,fp8,int8")
    parser.add_argument("--shapes", default=",".join(s[0] for s in ALL_SHAPES))
    args = parser.parse_args()
    bw = hbm_bandwidth()
    emit("hbm_copy_bandwidth", {}, bw / 1e12, "TB/s")
    torch.manual_seed(0)
    tuner = quant_kernels.Tuner()
    wanted = args.shapes.split(",")
    for name, k, n in (s for s in ALL_SHAPES if s[0] in wanted):
        base = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)  # uniform init
        for mode in args.modes.split(","):
            copies = min(64, math.ceil(ROTATE_BYTES / (k * n * BYTES_PER_WEIGHT[mode])))
            if mode == "bf16":
                weights = [base.weight.detach().clone() for _ in range(copies)]
                layers = [lambda x, w=w: F.linear(x, w) for w in weights]
                exact = base.weight.float()
            else:
                first = quantize_linear(base, mode, tuner=tuner)
                layers = [first] + [
                    QuantizedLinear(first.weight.clone(), first.scale, tuner=tuner) for _ in range(copies - 1)
                ]
                exact = dequantize_weight(first.weight, first.scale)
            floor_ms = k * n * BYTES_PER_WEIGHT[mode] / bw * 1e3
            for m in (int(r) for r in args.rows.split(",")):
                config = {"shape": name, "in": k, "out": n, "rows": m, "mode": mode, "copies": copies}
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                with torch.no_grad():
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    y = layers[0](x)
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - start
                    if mode != "bf16":
                        config["launch"] = dataclasses.asdict(tuner.config(x, first.weight, first.scale, None))
                        emit("first_call", config, first_s, "s")
                    emit("linear_rel_error", config, rel_error(y, x.float() @ base.weight.float().T), "rel")
                    emit("kernel_rel_error", config, rel_error(y, x.float() @ exact.T), "rel")
                    ms = time_ms([partial(layer, x) for layer in layers])
                emit("linear_time", config, ms, "ms")
                emit("linear_x_floor", config, ms / floor_ms, "x")
            del layers
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
