"""Image API throughput and latency against concurrency: the single-process server and Ray Serve replicas.

    python bench/serve.py                                       # CPU, the built-in model, 32x32, 2 steps
    python bench/serve.py --setups single,ray1,ray2 --concurrency 1,8,32,64
    python bench/serve.py --model path/to/NextStep-1.1 --size 256x256 --steps 28 --setups single,ray1,ray8 \
        --gpus-per-replica 1                                    # GPU machine: one replica per GPU

A setup is `single` (`nextstep serve`, batching up to --max-batch), `single-nobatch` (--max-batch 1) or
`rayN` (`nextstep serve --replicas N`: N replicas behind the Ray Serve gateway, one CPU core or
--gpus-per-replica GPUs each). Each starts as a subprocess on 127.0.0.1, is warmed up, then at each
concurrency c keeps c requests in flight until max(--requests, c) requests (n=1, own seeds) are done.
One JSON line per result: {"what", "config", "device", "number", "unit"}: images/s, p50/p95 latency, for
`single` the images per pipeline call from /metrics, and each setup's images/s against the first setup's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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


def server_command(args: argparse.Namespace, setup: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "nextstep.serve.api", "--model", str(args.model), "--port", str(port)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", "4096", "--default-size", args.size]
    cmd += ["--log-level", "warning", "--max-n", "1", "--timeout", "3600"]
    if args.device:
        cmd += ["--device", args.device]
    if setup == "single-nobatch":
        return cmd + ["--max-batch", "1"]
    cmd += ["--max-batch", str(args.max_batch)]
    if setup == "single":
        return cmd
    match = re.fullmatch(r"ray(\d+)", setup)
    if match is None:
        raise SystemExit(f"bench/serve.py: error: unknown setup {setup!r}: single, single-nobatch or rayN")
    return cmd + ["--replicas", match[1], "--gpus-per-replica", str(args.gpus_per_replica)]


def start_server(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    port = cmd[cmd.index("--port") + 1]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up in 600 s")


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


def bench_setup(args: argparse.Namespace, setup: str, device: str) -> dict[int, float]:
    proc, url = start_server(server_command(args, setup, free_port()))
    rates = {}
    try:
        asyncio.run(load(url, concurrency=4, requests=8, steps=args.steps, offset=10**6))  # warm-up, not timed
        for c in args.concurrency:
            requests = max(args.requests, c)
            before = httpx.get(f"{url}/metrics").json()
            wall, latencies = asyncio.run(load(url, concurrency=c, requests=requests, steps=args.steps, offset=0))
            after = httpx.get(f"{url}/metrics").json()
            config = {
                "setup": setup,
                "max_batch": 1 if setup == "single-nobatch" else args.max_batch,
                "max_wait_ms": args.max_wait_ms,
                "concurrency": c,
                "requests": requests,
                "size": args.size,
                "steps": args.steps,
                "model": Path(args.model).name,
            }
            rates[c] = requests / wall
            emit("images_per_s", config, round(rates[c], 2), "images/s", device)
            emit("latency_p50", config, round(1e3 * percentile(latencies, 50), 1), "ms", device)
            emit("latency_p95", config, round(1e3 * percentile(latencies, 95), 1), "ms", device)
            if setup.startswith("single"):  # a Ray deployment's /metrics is one replica's
                calls = after["batches"] - before["batches"]
                emit("images_per_pipeline_call", config, round(requests / max(calls, 1), 2), "images", device)
    finally:
        proc.terminate()
        proc.wait(120)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=builtin_model_dir() or REFERENCE, help="checkpoint directory")
    p.add_argument("--size", default="32x32", help="WIDTHxHEIGHT of every request")
    p.add_argument("--steps", type=int, default=2, help="head steps per token")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=8, help="requests per concurrency level (at least c)")
    p.add_argument("--setups", type=lambda s: s.split(","), default=["single", "ray1", "ray2"])
    p.add_argument("--max-batch", type=int, default=16, help="images per pipeline call (single and rayN)")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs per Ray replica (0: one CPU core)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args(argv)
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if use_cuda else f"cpu ({os.cpu_count()} cores)"
    emit("load_average_1min", {"when": "start"}, round(os.getloadavg()[0], 2), "runnable processes", device)
    rates = {setup: bench_setup(args, setup, device) for setup in args.setups}
    emit("load_average_1min", {"when": "end"}, round(os.getloadavg()[0], 2), "runnable processes", device)
    first = args.setups[0]
    for setup in args.setups[1:]:
        for c in args.concurrency:
            config = {"setup": setup, "baseline": first, "concurrency": c, "size": args.size, "steps": args.steps}
            emit("images_per_s_ratio", config, round(rates[setup][c] / rates[first][c], 2), "x", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
