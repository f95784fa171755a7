"""Weight-only quantised linear layers at decode batch sizes: what torchao gives, against bf16 and the roofline.

    PYTHONUNBUFFERED=1 python bench/quant_linear.py                 # the 14B decoder's and head's linears
    python bench/quant_linear.py --batches 2 --modes bf16,fp8       # a quick run

For each linear shape of the official 14B decoder and flow head, and each batch (rows, with guidance
branches counted), times y = x @ W.T with W in bf16, and with torchao's weight-only configs (int8, fp8 e4m3
per output channel, int4 per group of 128), each eager and under torch.compile. The roofline of each row
is the weight bytes of its precision over the measured HBM copy bandwidth. One JSON line per result:
{"what", "config", "device", "number", "unit"}. Needs CUDA and torchao.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import emit, hbm_bandwidth  # noqa: E402

DEVICE = "cuda"
# (name, in_features, out_features): the 14B decoder layer (qkv and gate/up fused as the engine runs them)
# and the flow head's widest linear.
SHAPES = [
    ("qkv", 5120, 7168),
    ("o", 5120, 5120),
    ("gate_up", 5120, 27648),
    ("down", 13824, 5120),
    ("head_mlp", 1536, 1536),
]
BYTES_PER_WEIGHT = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5}


def quantized(linear: torch.nn.Linear, mode: str) -> torch.nn.Module:
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = {
        "int8": Int8WeightOnlyConfig,
        "fp8": Float8WeightOnlyConfig,
        "int4": lambda: Int4WeightOnlyConfig(group_size=128),
    }[mode]()
    module = copy.deepcopy(linear)
    quantize_(module, config)
    return module


def time_ms(calls: list) -> float:
    """Per-call ms: median of 15 replays of one CUDA graph of max(20, len(calls)) calls, cycling `calls`
    (launch gaps out, as in the engine; several weight copies keep the reads in HBM, not L2)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    n = max(20, len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,64", help="rows per call (batch x guidance branches)")
    parser.add_argument("--modes", default="bf16,int8,fp8,int4")
    args = parser.parse_args()
    bw = hbm_bandwidth()
    emit("hbm_copy_bandwidth", {}, bw / 1e12, "TB/s")
    torch.manual_seed(0)
    for name, k, n in SHAPES:
        base = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
        for mode in args.modes.split(","):
            try:
                module = base if mode == "bf16" else quantized(base, mode)
            except Exception as e:  # noqa: BLE001 - a config torchao cannot build here is reported, not fatal
                emit("unsupported", {"shape": name, "mode": mode, "error": repr(e)[:200]}, 0.0, "-")
                continue
            floor_ms = k * n * BYTES_PER_WEIGHT[mode] / bw * 1e3
            for m in (int(b) for b in args.batches.split(",")):
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                ref = x.float() @ base.weight.float().T
                for compiled in (False, True):
                    fn = torch.compile(module, dynamic=False) if compiled else module
                    config = {"shape": name, "in": k, "out": n, "rows": m, "mode": mode, "compiled": compiled}
                    try:
                        with torch.no_grad():
                            err = ((fn(x).float() - ref).norm() / ref.norm()).item()
                            ms = time_ms([partial(fn, x)])
                    except Exception as e:  # noqa: BLE001
                        emit("failed", {**config, "error": repr(e)[:200]}, 0.0, "-")
                        continue
                    emit("linear_time", config, ms, "ms")
                    emit("linear_x_floor", config, ms / floor_ms, "x")
                    emit("linear_rel_error", config, err, "rel")
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
