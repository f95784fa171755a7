"""Image API throughput and latency against concurrency: the single-process server and Ray Serve replicas.

    python bench/serve.py                                       # CPU, the built-in model, 32x32, 2 steps
    python bench/serve.py --model-config tiny --duration 3      # CPU, a tiny random-weight model
    python bench/serve.py --model-config 1b --size 256x256 --steps 10 --duration 8 --requests 100000
                                                                # one H200: single, ray1, ray2 (0.5 GPU each)

A setup is `single` (`nextstep serve`, batching up to --max-batch), `single-nobatch` (--max-batch 1) or
`rayN` (`nextstep serve --replicas N`: N replicas behind the Ray Serve gateway, one CPU core each, or
--gpus-per-replica GPUs each, by default the visible GPUs shared evenly: 0.5 each for ray2 on one GPU).
The model is --model, or with --model-config a random-weight one of that shape written to a temporary
checkpoint (the built-in model's tokenizer and VAE). Each setup starts as a subprocess on 127.0.0.1 and is
warmed up at batch sizes 1 to 4 and --max-batch; then at each concurrency c, c clients each keep one request
(n=1, own seed) in flight until max(--requests, c) have started or --duration seconds have passed.
One JSON line per result: {"what", "config", "device", "number", "unit"}: images/s, p50/p95 latency, the
images per pipeline call (every replica's /metrics), and each setup's images/s against the first setup's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

from nextstep.assets import builtin_model_dir
from nextstep.io import write_json
from nextstep.model.checkpoint import build_model, save_pretrained
from nextstep.model.config import load_config
from nextstep.sampling.options import size_arg
from nextstep.sampling.pipeline import DEFAULTS_FILE

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "nextstep11-tiny"
SHAPE_FIELDS = (  # what --model-config changes of the built-in model's config; vocabulary and special ids stay
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "fm_head_dim",
    "fm_head_layers",
    "max_position_embeddings",
)
TINY = dict(zip(SHAPE_FIELDS, (64, 128, 2, 4, 2, 64, 2, 512), strict=True))


def emit(what: str, config: dict, number: float, unit: str, device: str) -> None:
    print(json.dumps({"what": what, "config": config, "device": device, "number": number, "unit": unit}), flush=True)


def model_shape(name: str) -> dict:
    """--model-config: `tiny`, or `1b` (configs/nextstep_1b.py's backbone with the release's 1536 x 12 head)."""
    if name == "tiny":
        return TINY
    if name == "1b":
        from configs.nextstep_1b import ARCH_1B

        return {f: getattr(ARCH_1B, f) for f in SHAPE_FIELDS}
    raise SystemExit(f"bench/serve.py: error: unknown --model-config {name!r}: tiny or 1b")


def random_checkpoint(shape: str, out: Path, *, size: tuple[int, int], device: str) -> int:
    """Write a random-weight model of `shape` to `out` with the built-in model's tokenizer and VAE, by our
    own save_pretrained (bf16 on CUDA), with sampling defaults at `size` (H, W); returns its parameters."""
    base = builtin_model_dir()
    if base is None:
        raise SystemExit("bench/serve.py: error: --model-config takes the built-in model's tokenizer and VAE: absent")
    config = replace(load_config(base / "config.json"), head_dim=None, **model_shape(shape))
    with torch.device(device):
        model = build_model(config)
    params = sum(t.numel() for t in model.parameters())
    if device == "cuda":
        model = model.to(torch.bfloat16)
    save_pretrained(model, out, tokenizer_dir=base, vae_dir=base / "vae")
    defaults = json.loads((base / DEFAULTS_FILE).read_text())
    write_json(out / DEFAULTS_FILE, {**defaults, "size": list(size), "trained": {"sizes": [list(size)]}})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the servers get the GPU
    return params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpus_per_replica(args: argparse.Namespace, replicas: int) -> float:
    """--gpus-per-replica, else the visible GPUs shared evenly (at most one each), else 0 (CPU replicas)."""
    if args.gpus_per_replica is not None:
        return args.gpus_per_replica
    if args.device == "cpu" or not torch.cuda.is_available():
        return 0
    return min(1, torch.cuda.device_count() / replicas)


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
    replicas = int(match[1])
    return cmd + ["--replicas", str(replicas), "--gpus-per-replica", f"{gpus_per_replica(args, replicas):g}"]


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


async def load(
    url: str, *, concurrency: int, requests: int, duration: float, steps: int, offset: int
) -> tuple[float, list[float]]:
    """`concurrency` clients each keep one request in flight until `requests` have started or `duration`
    seconds have passed (the first `concurrency` requests start regardless); wall seconds and each latency."""
    todo = iter(range(requests))
    latencies: list[float] = []
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            if i >= concurrency and time.perf_counter() - start > duration:
                return
            body = {"prompt": f"a shape number {offset + i}", "seed": offset + i, "steps": steps}
            sent = time.perf_counter()
            r = await http.post("/v1/images/generations", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def pipeline_calls(url: str, replicas: int) -> int:
    """Pipeline calls made so far by all `replicas` behind `url`: /metrics is the answering replica's (named by
    the x-nextstep-replica header through Ray), so ask until each has answered."""
    seen: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(50 * replicas):
            r = http.get("/metrics")
            seen[r.headers.get("x-nextstep-replica", "single")] = r.json()["batches"]
            if len(seen) == replicas:
                return sum(seen.values())
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered /metrics")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def bench_setup(args: argparse.Namespace, setup: str, device: str) -> dict[int, float]:
    proc, url = start_server(server_command(args, setup, free_port()))
    rates = {}
    try:
        for c in sorted({1, 2, 3, 4, args.max_batch}):  # warm-up, not timed: on CUDA each batch size's graphs
            asyncio.run(load(url, concurrency=c, requests=c, duration=math.inf, steps=args.steps, offset=10**6))
        for c in args.concurrency:
            requests = max(args.requests, c)
            replicas = int(setup[3:]) if setup.startswith("ray") else 1
            before = pipeline_calls(url, replicas)
            wall, latencies = asyncio.run(
                load(url, concurrency=c, requests=requests, duration=args.duration, steps=args.steps, offset=0)
            )
            calls = pipeline_calls(url, replicas) - before
            config = {
                "setup": setup,
                "max_batch": 1 if setup == "single-nobatch" else args.max_batch,
                "max_wait_ms": args.max_wait_ms,
                "concurrency": c,
                "requests": len(latencies),
                "size": args.size,
                "steps": args.steps,
                "model": args.model_config or Path(args.model).name,
            }
            if setup.startswith("ray"):
                config["gpus_per_replica"] = gpus_per_replica(args, int(setup[3:]))
            rates[c] = len(latencies) / wall
            emit("images_per_s", config, round(rates[c], 2), "images/s", device)
            emit("latency_p50", config, round(1e3 * percentile(latencies, 50), 1), "ms", device)
            emit("latency_p95", config, round(1e3 * percentile(latencies, 95), 1), "ms", device)
            emit("images_per_pipeline_call", config, round(len(latencies) / max(calls, 1), 2), "images", device)
    finally:
        proc.terminate()
        proc.wait(120)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=builtin_model_dir() or REFERENCE, help="checkpoint directory")
    p.add_argument("--model-config", default=None, help="tiny or 1b: a random-weight model of that shape instead")
    p.add_argument("--size", default="32x32", help="WIDTHxHEIGHT of every request")
    p.add_argument("--steps", type=int, default=2, help="head steps per token")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=8, help="requests per concurrency level (at least c)")
    p.add_argument("--duration", type=float, default=math.inf, help="seconds per level after which no request starts")
    p.add_argument("--setups", type=lambda s: s.split(","), default=["single", "ray1", "ray2"])
    p.add_argument("--max-batch", type=int, default=16, help="images per pipeline call (single and rayN)")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per Ray replica (default: see above)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args(argv)
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if use_cuda else f"cpu ({os.cpu_count()} cores)"
    emit("load_average_1min", {"when": "start"}, round(os.getloadavg()[0], 2), "runnable processes", device)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.model_config:
            start = time.perf_counter()
            size = size_arg(args.size)
            params = random_checkpoint(args.model_config, Path(tmp), size=size, device="cuda" if use_cuda else "cpu")
            args.model = Path(tmp)
            config = {"model": args.model_config, "parameters": params}
            emit("checkpoint_written", config, round(time.perf_counter() - start, 1), "s", device)
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
