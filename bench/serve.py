"""Image API throughput and latency against concurrency, with request batching on and off (max-batch 1).

    python bench/serve.py --model path/to/checkpoint --size 32x32 --steps 2        # CPU, tiny model
    python bench/serve.py --model path/to/NextStep-1.1 --size 256x256 --steps 28 --concurrency 1,8,32

Each setting starts `nextstep serve` (python -m nextstep.serve.api) as a subprocess on 127.0.0.1, warms it up,
then at each concurrency c keeps c requests in flight until `max(16, 4c)` requests (n=1, own seeds) are done.
One JSON line per result: {"what", "config", "device", "number", "unit"}: images/s, p50/p99 latency, and the
images per pipeline call read from /metrics; then the batched/unbatched images/s ratio per concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from nextstep.assets import builtin_model_dir

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "nextstep11-tiny"


def emit(what: str, config: dict, number: float, unit: str, device: str) -> None:
    print(json.dumps({"what": what, "config": config, "device": device, "number": number, "unit": unit}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nextstep.serve.api", "--model", str(args.model), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "4096"]
    cmd += ["--default-size", args.size, "--log-level", "warning", "--max-n", "1", "--timeout", "3600"]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 300 s")


async def load(url: str, *, concurrency: int, requests: int, steps: int, offset: int) -> tuple[float, list[float]]:
    """Keep `concurrency` requests in flight until `requests` are done; returns wall seconds and each latency."""
    todo = iter(range(requests))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            body = {"prompt": f"a shape number {offset + i}", "seed": offset + i, "steps": steps}
            start = time.perf_counter()
            r = await http.post("/v1/images/generations", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def bench_setting(args: argparse.Namespace, max_batch: int, device: str) -> dict[int, float]:
    proc, url = start_server(args, max_batch)
    rates = {}
    try:
        asyncio.run(load(url, concurrency=4, requests=8, steps=args.steps, offset=10**6))  # warm-up, not timed
        for c in args.concurrency:
            requests = max(16, 4 * c)
            before = httpx.get(f"{url}/metrics").json()
            wall, latencies = asyncio.run(load(url, concurrency=c, requests=requests, steps=args.steps, offset=0))
            after = httpx.get(f"{url}/metrics").json()
            config = {
                "max_batch": max_batch,
                "max_wait_ms": args.max_wait_ms,
                "concurrency": c,
                "requests": requests,
                "size": args.size,
                "steps": args.steps,
                "model": Path(args.model).name,
            }
            rates[c] = requests / wall
            calls = after["batches"] - before["batches"]
            emit("images_per_s", config, round(rates[c], 2), "images/s", device)
            emit("latency_p50", config, round(1e3 * percentile(latencies, 50), 1), "ms", device)
            emit("latency_p99", config, round(1e3 * percentile(latencies, 99), 1), "ms", device)
            emit("images_per_pipeline_call", config, round(requests / max(calls, 1), 2), "images", device)
    finally:
        proc.terminate()
        proc.wait(30)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=builtin_model_dir() or REFERENCE, help="checkpoint directory")
    p.add_argument("--size", default="32x32", help="WIDTHxHEIGHT of every request")
    p.add_argument("--steps", type=int, default=2, help="head steps per token")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--max-batch", type=int, default=16, help="the batched setting; the baseline is 1")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args(argv)
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if use_cuda else "cpu"
    baseline = bench_setting(args, 1, device)
    batched = bench_setting(args, args.max_batch, device)
    for c in args.concurrency:
        config = {"max_batch": args.max_batch, "baseline_max_batch": 1, "concurrency": c, "size": args.size}
        emit("batching_speedup", config, round(batched[c] / baseline[c], 2), "x", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
