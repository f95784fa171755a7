"""What partial images cost: seconds per final image with partial decoding every k token rows against none.

The partial images are those a stream sends before the pipeline's own final image (every_rows(final=False)).

    python bench/partial.py [--model DIR] [--rows 1,2,4] [--repeat 3]

The built-in model at its shipped sampling defaults (128x128, an 8x8 token grid), eager on the CPU or the
engine on the GPU; one warm-up image, then the settings interleaved `repeat` times (the median is kept), so a
busy machine slows them alike. On the CPU the process's CPU time is measured too (with --threads 1 it is the
work done, whatever else runs on the machine). One JSON line per result: seconds per image, and the slowdown
against none, by wall clock and by CPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nextstep.assets import builtin_model_dir
from nextstep.sampling.partial import every_rows
from nextstep.sampling.pipeline import GenerateOptions, Pipeline


def emit(what: str, config: dict, number: float, unit: str, device: str) -> None:
    print(json.dumps({"what": what, "config": config, "device": device, "number": number, "unit": unit}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=builtin_model_dir(), help="checkpoint directory (default: the built-in model)")
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    size = GenerateOptions(**pipe.defaults).size
    device = torch.cuda.get_device_name() if pipe.model.embed_tokens.weight.is_cuda else "cpu"
    settings = [0, *args.rows]  # 0: no partial images
    times: dict[int, list[float]] = {k: [] for k in settings}
    cpu_times: dict[int, list[float]] = {k: [] for k in settings}
    pipe.generate("a red circle", seed=0)  # warm-up
    for i in range(args.repeat):
        for k in settings:
            on_token = every_rows(pipe, size, rows=k, on_partial=lambda r, images: None, final=False) if k else None
            start, cpu_start = time.perf_counter(), time.process_time()
            pipe.generate("a red circle on a blue square", seed=i + 1, on_token=on_token)
            if pipe.model.embed_tokens.weight.is_cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
            cpu_times[k].append(time.process_time() - cpu_start)
    for clock, measured in (("wall", times), ("cpu", cpu_times)):
        base = statistics.median(measured[0])
        for k in settings:
            config = {"partial_every_rows": k, "clock": clock, "threads": args.threads, "repeat": args.repeat}
            config.update({key: value for key, value in pipe.defaults.items() if key != "edit"})
            seconds = statistics.median(measured[k])
            emit("seconds_per_image", config, round(seconds, 3), "s", device)
            if k:
                emit("partial_slowdown", config, round(100 * (seconds / base - 1), 1), "%", device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
