"""Image-token decoding speed: fast engine vs `--engine eager` vs the memory-bandwidth roofline.

    PYTHONUNBUFFERED=1 python bench/decode.py                  # official 14B shape, batch 1, 8, 32
    python bench/decode.py --shape 1.5b --batches 1 --compile  # quick run
    python bench/decode.py --batches 1 --heads fused --tokens 32 --official-eager-s 217  # engine vs eager
    python bench/decode.py --quantize fp8,int8 --tokens 0          # fp8 and int8 rows beside bf16's
    python bench/decode.py --batches 1,32 --heads fused,torch --quantize fp8 --steps 30 --tokens 0  # head: fused/torch
    python bench/decode.py --cold-start --quantize fp8 --steps 30   # fresh processes, empty then warm caches
    python bench/decode.py --batches 1 --heads fused --tokens 0 --quantize fp8 --layer-kernels off,on  # layer kernels
    python bench/decode.py --batches 1 --heads fused --steps 30 --tokens 0 --quantize fp8 --pdl off,on  # PDL (SM90+)

Random bf16 weights built directly on the GPU (then quantised for --quantize rows); each row's roofline
counts the bytes of its own precision. One JSON line per result:
{"what", "config", "device", "number", "unit"}; ratios as their own lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from nextstep.model.config import NextStepConfig
from nextstep.model.nextstep import NextStep
from nextstep.sampling.engine import Engine
from nextstep.sampling.flow import FlowSettings, guidance_rows, guidance_table
from nextstep.sampling.head_kernels import MAX_ROWS
from nextstep.sampling.layer_kernels import decode_layer
from nextstep.sampling.pipeline import GenerateOptions, Pipeline
from nextstep.sampling.quantize import MODES, apply_quantization

SHAPES = {
    "14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, vocab_size=1024, head_dim=64, fm_head_dim=256, fm_head_layers=3),
}  # fmt: skip
HEAD = dict(head_dim=128, fm_head_dim=1536, fm_head_layers=12)  # the official flow head and head_dim
DEVICE = "cuda"  # everything runs here
# Where Triton, inductor and our tuner (quant_kernels / head_kernels) keep what a later process reuses.
CACHE_ENV = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "NEXTSTEP_CACHE_DIR")
PROMPT_LEN = 40  # longest prompt row in tokens; other rows are left padded


def emit(what: str, config: dict, number: float, unit: str) -> None:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"what": what, "config": config, "device": dev, "number": number, "unit": unit}))


def hbm_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), median of 20."""
    src = torch.randn(int(gib * 2**30) // 4, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[3:])


def build_model(shape: str, quantize: str, *, device: str = DEVICE) -> NextStep:
    """A random bf16 model of `shape` on `device` (default inits: no zero-init adaLN, no host copy)."""
    cfg = NextStepConfig(**{**HEAD, **SHAPES[shape]}, rms_norm_eps=1e-5)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = NextStep(cfg)
    torch.set_default_dtype(torch.float32)
    return apply_quantization(model.eval(), quantize)


def prompt(cfg: NextStepConfig, batch: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows * B, PROMPT_LEN) random ids ending with boi; row i left padded by i % 8 tokens."""
    r = rows * batch
    ids = torch.randint(0, min(cfg.vocab_size, 150000), (r, PROMPT_LEN))
    ids[:, -1] = cfg.boi
    mask = torch.ones(r, PROMPT_LEN, dtype=torch.long)
    for i in range(r):
        mask[i, : i % 8] = 0
        ids[i, : i % 8] = cfg.pad_token_id_added
    return ids, mask


def num_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's weights as stored (its state_dict): fp8/int8 weights at 1 byte plus their scales;
    not the derived copies an engine adds (fused q/k/v and gate/up buffers are non-persistent)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def roofline(model: NextStep, batch: int, rows: int, n_tokens: int, steps: int, bw: float) -> dict:
    """Seconds per image token: decoder weights + mean live KV cache once, head weights once per step."""
    cfg = model.config
    weights = num_bytes(model.layers) + num_bytes(model.image_in_projector) + num_bytes(model.image_out_projector)
    kv_per_slot = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16 K and V
    kv = kv_per_slot * rows * batch * (PROMPT_LEN + n_tokens / 2)
    net = model.image_head.net
    head = num_bytes(net)
    adaln = sum(num_bytes(b.adaLN_modulation) for b in net.res_blocks) + num_bytes(net.final_layer.adaLN_modulation)
    once = adaln + num_bytes(net.cond_embed) + num_bytes(net.time_embed)  # what the engine reads once per token
    return {
        "backbone": (weights + kv) / bw,
        "head": head * steps / bw,
        "head_engine": (once + (head - once) * steps) / bw,
        "bytes": weights + kv + head * steps,
    }


def time_engine(engine: Engine, model, batch, rows, settings, opts, n_tokens, window, offsets) -> dict:
    """Per-token head and backbone seconds over windows of tokens at several positions (CUDA events)."""
    ids, mask = prompt(model.config, batch, rows)
    latents = torch.zeros(0, model.config.token_dim, device=DEVICE)
    t0 = time.perf_counter()
    st, n_prefix = engine.start(ids, mask, latents, settings, opts, n_tokens=n_tokens)
    torch.cuda.synchronize()
    ready = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.start(ids, mask, latents, settings, opts, n_tokens=n_tokens)  # prefill alone, graphs cached
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    scales = guidance_table(settings.family, opts, n_tokens).to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    head, backbone = [], []
    with torch.inference_mode():
        for start in offsets:
            ev = []
            for j, k in enumerate(range(start - 4, start + window)):
                k = max(k, 0)
                e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                e[0].record()
                st.noise.normal_(generator=gen)
                st.scales.copy_(scales[k])
                st.head()
                e[1].record()
                st.slot.fill_(n_prefix + k)
                st.decode_graph(n_prefix + k)()
                e[2].record()
                if j >= 4:  # the first 4 of each window warm up
                    ev.append(e)
            torch.cuda.synchronize()
            head += [a.elapsed_time(b) / 1e3 for a, b, _ in ev]
            backbone += [b.elapsed_time(c) / 1e3 for _, b, c in ev]
    return {
        "head": statistics.mean(head),
        "backbone": statistics.mean(backbone),
        "prefill": prefill,
        "ready": ready,
        "image": prefill + n_tokens * (statistics.mean(head) + statistics.mean(backbone)),
    }


def time_eager(model, rows, settings, opts, tokens: int) -> float:
    """Seconds per image token of `--engine eager` (Pipeline.generate_tokens: the engine's code without CUDA
    graphs, fused kernels or compile; batch 1) over `tokens` tokens, after a 4-token warm-up. The timed call
    includes its prefill of PROMPT_LEN tokens and attends to at most 256 cache slots."""
    pipe = Pipeline.__new__(Pipeline)
    pipe.model, pipe.vae, pipe._engine = model, SimpleNamespace(config=SimpleNamespace(down_factor=8)), None
    eager = dataclasses.replace(opts, engine="eager")
    ids, mask = prompt(model.config, 1, rows)
    latents = torch.zeros(0, model.config.token_dim, device=DEVICE)
    pipe.generate_tokens(ids, mask, latents, settings, dataclasses.replace(eager, size=(16, 64)), seed=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.generate_tokens(ids, mask, latents, settings, dataclasses.replace(eager, size=(16, 16 * tokens)), seed=0)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / tokens
    assert not pipe.engine(eager).graphs  # what was timed ran without graphs
    return seconds


def profile_kernels(model, rows, settings, opts, n_tokens: int, layer_kernels: bool) -> tuple[float, float, str]:
    """Summed kernel time (s) of one head loop and one backbone step, run without graphs (batch 1):
    graph time minus this is launch gaps and tiny-kernel overhead."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, graphs=False, layer_kernels=layer_kernels)
    ids, mask = prompt(model.config, 1, rows)
    st, n_prefix = engine.start(ids, mask, torch.zeros(0, 64, device=DEVICE), settings, opts, n_tokens=n_tokens)
    sums, table = [], ""
    with torch.inference_mode():
        for fn in (st.head, st.decode_graph(n_prefix)):
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            events = prof.key_averages()
            sums.append(sum(e.self_device_time_total for e in events) / 1e6)
            table += events.table(sort_by="self_device_time_total", row_limit=12) + "\n"
    return sums[0], sums[1], table


def first_and_steady(args, quantize: str) -> tuple[float, float, dict[str, float]]:
    """Seconds from `start` (the parent's clock when it launched this process) to the first image, and of a
    second image in the same process: one 512px (--size) batch-1 image of --shape's random model through the
    default engine, or of --model's pipeline (nextstep.load + generate, VAE decode included); and where the
    first one's extra time went: process start and imports, the model (built or loaded), the engine, and the
    first image's call beyond a steady one (tuning, compiling, graph capture)."""
    clock = [args.cold_start_child, time.time()]  # launch, imports done; then each phase's end
    if args.model is not None:
        import nextstep

        pipe = nextstep.load(args.model, device=args.device, quantize=quantize)
        options = dict(size=(args.size, args.size), steps=args.steps, cfg=args.cfg, seed=0)
        image = lambda: pipe.generate("two red circles above a blue star", **options)  # noqa: E731
        names = ["process_and_imports", "model"]
    else:
        model = build_model(args.shape, quantize, device=args.device)
        clock.append(time.time())
        opts = GenerateOptions(size=(args.size, args.size), steps=args.steps, cfg=args.cfg, sampler="sde")
        settings = FlowSettings(family=model.config.family, num_steps=args.steps, rule="sde")
        ids, mask = prompt(model.config, 1, guidance_rows(opts.cfg, opts.cfg_img))
        latents = torch.zeros(0, model.config.token_dim, device=args.device)
        engine = Engine(model, compile=args.compile)
        n_tokens = (args.size // 16) ** 2
        image = lambda: engine.generate(ids, mask, latents, settings, opts, n_tokens=n_tokens, seed=0)  # noqa: E731
        names = ["process_and_imports", "model", "engine"]
    clock.append(time.time())
    phases = {name: clock[i + 1] - clock[i] for i, name in enumerate(names)}
    for _ in range(2):
        image()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        clock.append(time.time())
    steady = clock[-1] - clock[-2]
    phases["first_call_minus_steady"] = clock[-2] - clock[-3] - steady
    return clock[-2] - clock[0], steady, phases


def cold_start_child(args) -> None:
    """The measured process (one --quantize value): [first, steady, phases] on its last stdout line."""
    print(json.dumps(first_and_steady(args, args.quantize)), flush=True)


def cold_start(args, base: dict, modes: list[str]) -> None:
    """Per precision: two fresh processes sharing cache directories that start empty (Triton, inductor,
    NEXTSTEP_CACHE_DIR for our tuner, and --cache-env), the first compiling and tuning into them, the
    second reusing them; each reports time to first image (process start to image) minus steady image time."""
    names = [*CACHE_ENV, *filter(None, args.cache_env.split(","))]
    forwarded = ["--shape", args.shape, "--size", str(args.size), "--steps", str(args.steps), "--cfg", str(args.cfg)]
    forwarded += ["--device", args.device] + (["--model", args.model] if args.model else [])
    forwarded += ["--compile"] if args.compile else []
    for quantize in modes:
        with tempfile.TemporaryDirectory(prefix="nextstep-cold-") as tmp:
            env = {**os.environ, **{name: str(Path(tmp) / name.lower()) for name in names}}
            for run in ("cold", "warm"):
                argv = [sys.executable, __file__, *forwarded, "--quantize", quantize, "--cold-start-child"]
                r = subprocess.run([*argv, repr(time.time())], env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"cold-start child failed ({r.returncode}):\n{r.stderr[-4000:]}")
                first, steady, phases = json.loads(r.stdout.strip().splitlines()[-1])
                cfg = {**base, "quantize": quantize, "batch": 1, "caches": run, "cache_env": names,
                       "model": args.model or f"random {args.shape}", "compile": args.compile}  # fmt: skip
                emit("cold_start_first_image", cfg, first, "s")
                emit("cold_start_steady_image", cfg, steady, "s")
                emit("cold_start_first_minus_steady", cfg, first - steady, "s")
                for phase, seconds in phases.items():  # they add up to first - steady
                    emit("cold_start_phase", {**cfg, "phase": phase}, seconds, "s")


def time_precision(args, quantize: str, bw: float, base: dict) -> dict[int, float]:
    """Every row of one weight precision (engine per batch and head, roofline of the same bytes, eager,
    profile); returns seconds per image by batch (the engine's default head where both ran)."""
    torch.manual_seed(0)  # the same random weights for every precision
    model = build_model(args.shape, quantize)
    opts = GenerateOptions(size=(args.size, args.size), steps=args.steps, cfg=args.cfg, sampler="sde")
    settings = FlowSettings(family=model.config.family, num_steps=args.steps, rule="sde")
    rows = guidance_rows(opts.cfg, opts.cfg_img)
    n_tokens = (args.size // 16) ** 2
    w = args.window
    offsets = (0, n_tokens // 2 - w // 2, n_tokens - w)
    base = {**base, "quantize": quantize}
    per_image, backbone, head_s = {}, {}, {}
    heads, layers, pdls = args.heads.split(","), args.layer_kernels.split(","), args.pdl.split(",")
    runs = [(int(b), h, lk, p) for b in args.batches.split(",") for h in heads for lk in layers for p in pdls]
    steps = {}  # (batch, head, layer kernels, pdl) -> the timings
    for batch, head_impl, layer_impl, pdl in runs:
        if head_impl == "fused" and batch * rows > MAX_ROWS and "torch" in heads:
            continue  # too many rows for the fused kernels: the engine would run the torch head anyway
        on = layer_impl == "on"
        weights_gib = torch.cuda.memory_allocated() / 2**30  # the model as stored (no engine yet)
        torch.cuda.reset_peak_memory_stats()
        engine = Engine(
            model, compile=args.compile, head_kernels=head_impl == "fused", layer_kernels=on, pdl=pdl == "on"
        )
        t = time_engine(engine, model, batch, rows, settings, opts, n_tokens, w, offsets)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30  # weights + engine copies, caches, graphs, activations
        head_impl = "fused" if engine._state.head_kernels else "torch"  # more rows than MAX_ROWS: torch
        layer_fn = getattr(engine._state.layer_fn, "func", None)
        assert (layer_fn is decode_layer) == on  # what is timed is what the row names
        tuned = dataclasses.asdict(engine._state.launch) if head_impl == "fused" else None
        del engine
        gc.collect()  # the engine's state and graphs form a cycle; free them before the next batch
        torch.cuda.empty_cache()
        cfg = {
            **base,
            "batch": batch,
            "rows": rows * batch,
            "compile": args.compile,
            "head": head_impl,
            "head_kernel_config": tuned,
            "layer_kernels": layer_impl,
            "pdl": pdl,
            "window": f"3 windows of {w} tokens at {list(offsets)}, mean x {n_tokens} tokens + prefill",
        }
        roof = roofline(model, batch, rows, n_tokens, args.steps, bw)
        step = t["head"] + t["backbone"]
        emit("engine_token_latency", cfg, step * 1e3, "ms/token")
        emit("engine_token_backbone", cfg, t["backbone"] * 1e3, "ms/token")
        emit("engine_token_head", cfg, t["head"] * 1e3, "ms/token")
        emit(
            "engine_ready_first_call",
            {**cfg, "includes": "state alloc + graph capture + prefill"},
            t["ready"],
            "s",
        )
        emit("engine_seconds_per_image", cfg, t["image"] / batch, "s/image")
        emit("engine_images_per_second", cfg, batch / t["image"], "images/s")
        emit("engine_peak_memory", {**cfg, "weights_gib": round(weights_gib, 2)}, peak_gib, "GiB")
        floor, floor_engine = roof["backbone"] + roof["head"], roof["backbone"] + roof["head_engine"]
        emit("roofline_token_latency", {**cfg, "bytes": roof["bytes"]}, floor * 1e3, "ms/token")
        emit("roofline_seconds_per_image", {**cfg, "bytes": roof["bytes"]}, floor * n_tokens / batch, "s/image")
        note = "adaLN, cond and time weights read once per token"
        emit("roofline_token_latency_engine_algorithm", {**cfg, "note": note}, floor_engine * 1e3, "ms/token")
        emit("ratio_engine_over_roofline", cfg, step / floor, "x")
        first = layer_impl == layers[0] and pdl == pdls[0]
        if first and (head_impl == "fused" or batch not in per_image):  # the default head
            per_image[batch] = t["image"] / batch
        if pdl == pdls[0]:
            backbone[batch, head_impl, layer_impl] = t["backbone"]
        if first:
            head_s[batch, head_impl] = t["head"]
        if layer_impl == "on" and pdl == pdls[0] and (batch, head_impl, "off") in backbone:
            ratio = t["backbone"] / backbone[batch, head_impl, "off"]
            emit("ratio_backbone_layer_kernels_on_over_off", {**cfg, "layer_kernels": "on / off"}, ratio, "x")
        steps[batch, head_impl, layer_impl, pdl] = t
        on_off = [steps.get((batch, head_impl, layer_impl, p)) for p in ("on", "off")]
        if pdl == pdls[-1] and all(on_off):  # both timed (in either order): token, head and backbone on / off
            for part in ("token", "head", "backbone"):
                on_s, off_s = ((x["head"] + x["backbone"]) if part == "token" else x[part] for x in on_off)
                emit(f"ratio_{part}_pdl_on_over_off", {**cfg, "pdl": "on / off"}, on_s / off_s, "x")
        print(f"# {quantize} batch {batch} ({head_impl} head, layer kernels {layer_impl}, pdl {pdl}): head"
              f" {t['head'] * 1e3:.2f} ms backbone {t['backbone'] * 1e3:.2f} ms roofline {floor * 1e3:.2f} ms",
              flush=True)  # fmt: skip
    for batch in per_image:
        if (batch, "fused") in head_s and (batch, "torch") in head_s:
            cfg = {**base, "batch": batch, "rows": rows * batch}
            emit("ratio_head_torch_over_fused", cfg, head_s[batch, "torch"] / head_s[batch, "fused"], "x")
    if 1 in per_image and 32 in per_image:
        emit("ratio_images_per_s_batch32_over_batch1", base, per_image[1] / per_image[32], "x")
    if args.tokens:
        cfg = {**base, "batch": 1, "engine": "eager", "tokens_timed": args.tokens}
        eager = time_eager(model, rows, settings, opts, args.tokens)
        emit("eager_seconds_per_token", cfg, eager, "s/token")
        emit("eager_seconds_per_image", {**cfg, "extrapolated_to": n_tokens}, eager * n_tokens, "s/image")
        if 1 in per_image:
            emit("ratio_eager_over_engine", cfg, eager * n_tokens / per_image[1], "x")
        if args.official_eager_s:
            official = {**cfg, "official_eager_s_per_image": args.official_eager_s}
            emit("ratio_eager_over_official_eager", official, eager * n_tokens / args.official_eager_s, "x")
    for layer_impl in layers if args.profile else ():
        head, step, table = profile_kernels(model, rows, settings, opts, n_tokens, layer_impl == "on")
        print(table, flush=True)
        cfg = {**base, "batch": 1, "layer_kernels": layer_impl, "note": "sum of kernel times, one token, no graph"}
        emit("kernel_time_head", cfg, head * 1e3, "ms/token")
        emit("kernel_time_backbone", cfg, step * 1e3, "ms/token")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return per_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="14b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512 -> 1024 tokens)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--window", type=int, default=32, help="timed tokens per window (3 windows)")
    ap.add_argument("--tokens", type=int, default=32, help="image tokens timed on --engine eager, batch 1 (0: skip)")
    ap.add_argument(
        "--official-eager-s",
        type=float,
        default=None,
        help="seconds per image of the official eager pipeline measured on this machine, for a ratio line",
    )
    ap.add_argument(
        "--quantize",
        default="none",
        help="comma list of weight precisions timed after bf16 in the same run: fp8, int8 (none: bf16 only)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the layer and head step")
    ap.add_argument("--profile", action="store_true", help="kernel-time split of one token, no graphs")
    ap.add_argument(
        "--heads",
        default="fused,torch",
        help="comma list of head implementations per batch: fused (Triton kernels, the default) | torch",
    )
    ap.add_argument(
        "--layer-kernels",
        default=None,
        help="comma list per batch and head: off (eager decoder layer) | on (Triton layer kernels, layer_kernels.py);"
        " ratio lines use the first (default: the engine's, on; off with --compile)",
    )
    ap.add_argument(
        "--pdl",
        default="off",
        help="comma list per batch, head and layer kernels: off | on (programmatic dependent launch of the decode"
        " kernels, SM90+: Engine(pdl=True)), timed in one run; ratio lines on / off",
    )
    ap.add_argument(
        "--cold-start",
        action="store_true",
        help="time to first image minus steady image time of two fresh processes, empty caches then reused",
    )
    ap.add_argument("--cache-env", default="", help="comma list of more cache-directory variables to empty")
    ap.add_argument("--model", default=None, help="--cold-start: time nextstep.load(DIR) + generate, not --shape")
    ap.add_argument("--device", default=DEVICE, help="--cold-start: cuda, or cpu for a smoke test")
    ap.add_argument("--cold-start-child", type=float, default=None, help=argparse.SUPPRESS)  # its start time
    args = ap.parse_args()
    modes = [m for m in args.quantize.split(",") if m != "none"]
    if set(modes) - set(MODES):
        ap.error(f"--quantize takes none or a comma list of {', '.join(MODES)}, got {args.quantize!r}")
    if args.layer_kernels is None:
        args.layer_kernels = "off" if args.compile else "on"
    if not args.layer_kernels or set(args.layer_kernels.split(",")) - {"off", "on"}:
        ap.error(f"--layer-kernels takes a comma list of off, on, got {args.layer_kernels!r}")
    if not args.pdl or set(args.pdl.split(",")) - {"off", "on"}:
        ap.error(f"--pdl takes a comma list of off, on, got {args.pdl!r}")
    if args.compile and "on" in args.layer_kernels.split(","):
        ap.error("--layer-kernels on does not combine with --compile (the engine then compiles its own layer)")
    if args.cold_start_child is not None:
        return cold_start_child(args)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = {"shape": args.shape, "size": args.size, "steps": args.steps, "cfg": args.cfg, "dtype": "bf16"}
    if args.cold_start:
        return cold_start(args, base, ["none", *modes])

    if not torch.cuda.is_available():
        ap.error("timing the engine needs a CUDA device (--cold-start --device cpu is a CPU smoke test)")
    bw = hbm_bandwidth()
    emit(
        "hbm_bandwidth",
        {"method": "2 GiB device-to-device copy, read+write bytes, median of 20"},
        bw / 1e12,
        "TB/s",
    )
    per_image = {quantize: time_precision(args, quantize, bw, base) for quantize in ["none", *modes]}
    for quantize in modes:
        for batch, seconds in per_image[quantize].items():
            if batch in per_image["none"]:
                cfg = {**base, "quantize": quantize, "batch": batch}
                emit("ratio_seconds_per_image_over_bf16", cfg, seconds / per_image["none"][batch], "x")


if __name__ == "__main__":
    main()
