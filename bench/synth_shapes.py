"""How fast is `nextstep data synth-shapes`? Samples/s written to shards for each worker count.

    python3 bench/synth_shapes.py --n 4000 --workers 1 2

Prints one JSON line per result: {"what", "config", "device", "number", "unit"}, and for 1 worker the CPU
time per sample (robust to a busy machine). The spawned workers' start-up is inside the timing (it is part of
every real run); --n should cover several shards per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from nextstep.shapes.synth import make_sample, write_synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="samples per run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    args = p.parse_args()
    device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    make_sample(0, seed=0, size=args.size)  # warm-up: imports and lazily built tables
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            start, cpu = time.perf_counter(), time.process_time()
            write_synthetic(Path(tmp), n=args.n, seed=0, workers=workers, size=args.size, shard_size=args.shard_size)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        config = {"n": args.n, "workers": workers, "size": args.size, "shard_size": args.shard_size}
        result = {"what": "synth-shapes write", "config": config, "device": device}
        print(json.dumps({**result, "number": round(args.n / seconds, 1), "unit": "samples/s"}), flush=True)
        if workers == 1:  # in-process, so CPU time per sample holds even on a busy machine
            result["what"] = "synth-shapes write, CPU time"
            print(json.dumps({**result, "number": round(cpu / args.n * 1e3, 3), "unit": "cpu ms/sample"}), flush=True)


if __name__ == "__main__":
    main()
