"""Seconds per 128x128 image with the built-in model on the CPU, eager fp32 (the CI machine's path).

    python bench/builtin_cpu.py [--model DIR] [--repeat 3]

Measures the shipped sampling defaults and, as the baseline in the same run, the official NextStep-1.1
text-to-image settings (30 head steps, cfg 7.5); one warm-up image first. One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import nextstep


def seconds_per_image(pipe, prompt: str, repeat: int, **options) -> float:
    pipe.generate(prompt, seed=0, **options)  # warm-up
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        pipe.generate(prompt, seed=i + 1, **options)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    pipe = nextstep.load(args.model, device="cpu")
    device = f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    prompt = "two red circles above a blue star"
    runs = {
        "shipped defaults": {},
        "baseline: official 1.1 settings (30 steps, cfg 7.5)": {"steps": 30, "cfg": 7.5},
    }
    results = {}
    for name, options in runs.items():
        sec = seconds_per_image(pipe, prompt, args.repeat, **options)
        results[name] = sec
        config = {"settings": name, **pipe.defaults, **options, "repeat": args.repeat}
        print(
            json.dumps(
                {
                    "what": "seconds per 128px image",
                    "config": config,
                    "device": device,
                    "number": round(sec, 3),
                    "unit": "s",
                }
            )
        )
    base, ours = results[list(runs)[1]], results[list(runs)[0]]
    print(
        json.dumps(
            {
                "what": "baseline / shipped-defaults time",
                "config": {},
                "device": device,
                "number": round(base / ours, 2),
                "unit": "x",
            }
        )
    )


if __name__ == "__main__":
    main()
