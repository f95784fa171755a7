"""Fused Triton kernels for the flow head at decode time: two kernels per adaLN block instead of six.

At batch 1 with guidance the head runs on 2 rows, 50 steps per token, 12 blocks per step: thousands of
tiny launches per token, each a 1536x1536 GEMV or an elementwise op on 2 rows. Launch gaps, not bytes,
bound that loop. Each block becomes

    a   = silu((LN(h) * scale1 + shift) @ W1.T + b1)     `modulated_linear` (LayerNorm prologue)
    h'  = h + gate * (a @ W2.T + b2)                     `gated_linear`     (residual epilogue)

and the final layer is `modulated_linear` without activation. Each program owns BLOCK_N output columns
for all rows, so every weight is read once per step, at GEMV bandwidth. Up to BROADCAST_ROWS rows (batch
1-4 with guidance) a program multiplies by broadcasting and reducing; more rows (up to MAX_ROWS: batch 32
with guidance) go through tl.dot, the rows padded to 16/32/64 and masked (the constexpr DOT).
Weight-only fp8/int8 linears (quantize.QuantizedLinear) are read as 1 byte per weight, converted in
registers, and their per-output-channel scale multiplies the fp32 sums: no dequantised copy in HBM.
Used by the engine on CUDA when Triton is present (`Engine(head_kernels=...)`); tests also run them in
Triton's CPU interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nextstep.model.head import compute_dtype
from nextstep.sampling.tuning import TuningCache, entry_key

try:
    import triton
    import triton.language as tl

    from nextstep.sampling.pdl import wait_previous
except ImportError:  # the CPU install has no Triton; the engine then uses the torch ops
    triton = None

MAX_ROWS = 64  # guidance rows x images handled by one program; larger batches use cuBLAS (launches amortise)
BROADCAST_ROWS = 8  # up to this many rows a broadcast multiply; more: tl.dot (which pads the rows to 16)


def available(device: torch.device) -> bool:
    """Triton present and a CUDA device (tests also run the kernels on CPU under TRITON_INTERPRET=1)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _rows_dot(a, w, DOT: tl.constexpr):
        """a (BLOCK_R, BLOCK_K) in the linear's input dtype x w (BLOCK_N, BLOCK_K) -> (BLOCK_R, BLOCK_N) fp32.
        A few rows: a broadcast multiply and a reduction in fp32. DOT: tl.dot on the tensor cores with fp32
        accumulation, w converted to a's dtype first (exact: fp8 e4m3 and int8 values are bf16/fp16 values;
        fp32 stays IEEE fp32, not TF32)."""
        if DOT:
            return tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee")
        else:
            return tl.sum(a.to(tl.float32)[:, None, :] * w[None, :, :].to(tl.float32), axis=2)

    @triton.jit
    def _row_moments(
        x_ptr, rows, rmask, K: tl.constexpr, eps, BLOCK_K: tl.constexpr, K_POW2: tl.constexpr, DOT: tl.constexpr
    ):
        """LayerNorm (mean, rstd) (BLOCK_R,) fp32 of rows (R, K), centred before squaring. A few rows: the
        whole rows in one load (R x K is a few KB). DOT (16-64 rows would not fit in registers): two passes
        over BLOCK_K slices."""
        if DOT:
            total = tl.zeros([rows.shape[0]], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                m = rmask[:, None] & (ks < K)[None, :]
                total += tl.sum(tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=m, other=0.0).to(tl.float32), 1)
            mean = total / K
            total = tl.zeros([rows.shape[0]], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                m = rmask[:, None] & (ks < K)[None, :]
                xa = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=m, other=0.0).to(tl.float32)
                d = tl.where(m, xa - mean[:, None], 0.0)
                total += tl.sum(d * d, axis=1)
        else:
            kall = tl.arange(0, K_POW2)
            m = rmask[:, None] & (kall < K)[None, :]
            xa = tl.load(x_ptr + rows[:, None] * K + kall[None, :], mask=m, other=0.0).to(tl.float32)
            mean = tl.sum(xa, axis=1) / K
            d = tl.where((kall < K)[None, :], xa - mean[:, None], 0.0)
            total = tl.sum(d * d, axis=1)
        return mean, 1.0 / tl.sqrt(total / K + eps)

    @triton.jit
    def _k_slice(rows, rmask, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
        """The K slice k0 .. k0 + BLOCK_K: (ks, ks < K, its (rows, ks) mask, the offsets of (rows, ks) in (R, K))."""
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        return ks, kmask, rmask[:, None] & kmask[None, :], rows[:, None] * K + ks[None, :]

    @triton.jit
    def _weight_tile(w_ptr, cols, nmask, ks, kmask, K: tl.constexpr):
        """w (N, K) at columns `cols`, K slice ks -> (BLOCK_N, BLOCK_K), zero outside."""
        return tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)

    @triton.jit
    def _modulated_input(
        x_ptr, lnw_ptr, lnb_ptr, scale_ptr, shift_ptr, m, offs, ks, kmask, mean, rstd, HAS_AFFINE: tl.constexpr
    ):
        """LN(x) * scale1 + shift over one K slice ks (kmask: ks < K; m, offs: its (rows, ks) mask and offsets)
        -> (BLOCK_R, BLOCK_K) in x's dtype."""
        a = (tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_AFFINE:
            lw = tl.load(lnw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            lb = tl.load(lnb_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            a = a * lw[None, :] + lb[None, :]
        sc = tl.load(scale_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + offs, mask=m, other=0.0).to(tl.float32)
        return (a * sc + sh).to(x_ptr.dtype.element_ty)  # rounded like the eager op's input

    @triton.jit
    def _modulated_linear(
        x_ptr,  # (R, K) block input h
        lnw_ptr,  # (K,) LayerNorm weight (unused without HAS_AFFINE)
        lnb_ptr,  # (K,) LayerNorm bias
        scale_ptr,  # (R, K) 1 + adaLN scale
        shift_ptr,  # (R, K) adaLN shift
        w_ptr,  # (N, K) linear weight: float, or fp8/int8 with a scale
        ws_ptr,  # (N,) fp32 per-channel weight scale (unused without HAS_SCALE)
        b_ptr,  # (N,) linear bias
        out_ptr,  # (R, N)
        R,
        K: tl.constexpr,  # loop bound: the interpreter needs an int (NumPy >= 2.5); the head has 2-3 widths
        N,
        eps,
        HAS_AFFINE: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_POW2: tl.constexpr,
        DOT: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (pdl.py)
    ):
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < R
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        # With PDL and a few rows, the first weight tile (the whole K untuned) loads before the wait; tl.dot's
        # two-pass moments of 16-64 rows would hold it in registers through both passes, so it waits first.
        EARLY: tl.constexpr = PDL and not DOT
        if EARLY:
            ks, kmask, m, offs = _k_slice(rows, rmask, 0, K, BLOCK_K)
            w_first = _weight_tile(w_ptr, cols, nmask, ks, kmask, K)
        wait_previous(PDL)
        mean, rstd = _row_moments(x_ptr, rows, rmask, K, eps, BLOCK_K, K_POW2, DOT)
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        if EARLY:  # the first K slice with the weight tile loaded before the wait
            a = _modulated_input(x_ptr, lnw_ptr, lnb_ptr, scale_ptr, shift_ptr, m, offs, ks, kmask, mean, rstd,
                                 HAS_AFFINE)  # fmt: skip
            acc += _rows_dot(a, w_first, DOT)
        for k0 in range(EARLY * BLOCK_K, K, BLOCK_K):
            ks, kmask, m, offs = _k_slice(rows, rmask, k0, K, BLOCK_K)
            w = _weight_tile(w_ptr, cols, nmask, ks, kmask, K)
            a = _modulated_input(x_ptr, lnw_ptr, lnb_ptr, scale_ptr, shift_ptr, m, offs, ks, kmask, mean, rstd,
                                 HAS_AFFINE)  # fmt: skip
            acc += _rows_dot(a, w, DOT)
        if HAS_SCALE:
            acc *= tl.load(ws_ptr + cols, mask=nmask, other=0.0)[None, :]
        acc += tl.load(b_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        out = out_ptr + rows[:, None] * N + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])

    @triton.jit
    def _gated_linear(
        a_ptr,  # (R, K) hidden activations
        w_ptr,  # (N, K) linear weight: float, or fp8/int8 with a scale
        ws_ptr,  # (N,) fp32 per-channel weight scale (unused without HAS_SCALE)
        b_ptr,  # (N,) bias
        gate_ptr,  # (R, N) adaLN gate
        res_ptr,  # (R, N) residual h
        out_ptr,  # (R, N)
        R,
        K: tl.constexpr,  # as in _modulated_linear
        N,
        HAS_SCALE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT: tl.constexpr,
        PDL: tl.constexpr,  # as in _modulated_linear; the first weight tile loads before the wait
    ):
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < R
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        if PDL:
            ks, kmask, m, offs = _k_slice(rows, rmask, 0, K, BLOCK_K)
            w_first = _weight_tile(w_ptr, cols, nmask, ks, kmask, K)
        wait_previous(PDL)
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        if PDL:  # the first K slice with the weight tile loaded before the wait
            acc += _rows_dot(tl.load(a_ptr + offs, mask=m, other=0.0), w_first, DOT)
        for k0 in range(PDL * BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            w = _weight_tile(w_ptr, cols, nmask, ks, kmask, K)
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += _rows_dot(a, w, DOT)
        if HAS_SCALE:
            acc *= tl.load(ws_ptr + cols, mask=nmask, other=0.0)[None, :]
        acc += tl.load(b_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        offs = rows[:, None] * N + cols[None, :]
        m = rmask[:, None] & nmask[None, :]
        g = tl.load(gate_ptr + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (r + g * acc).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _input_rows(
        x_ptr,  # (B, K) tokens, fp32
        w_ptr,  # (N, K) input_proj weight: float, or fp8/int8 with a scale
        ws_ptr,  # (N,) fp32 per-channel weight scale (unused without HAS_SCALE)
        b_ptr,  # (N,)
        out_ptr,  # (R, N), row r = input_proj(x[r % B]): the guidance rows share one token
        B,
        R,
        K,
        N,
        HAS_SCALE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        K_POW2: tl.constexpr,
        DOT: tl.constexpr,
        PDL: tl.constexpr,  # as in _modulated_linear; the weight (one tile) loads before the wait
    ):
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < R
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        ks = tl.arange(0, K_POW2)
        kmask = ks < K
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        wait_previous(PDL)
        a = tl.load(x_ptr + (rows % B)[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = _rows_dot(a.to(out_ptr.dtype.element_ty), w, DOT)  # input in the linear's dtype
        if HAS_SCALE:
            acc *= tl.load(ws_ptr + cols, mask=nmask, other=0.0)[None, :]
        acc += tl.load(b_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows[:, None] * N + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None] & nmask[None, :],
        )


@dataclass(frozen=True)
class LaunchConfig:
    """How the block kernels are launched; `tune` picks one per GPU, head width, weight format and row
    count, and the engine that tuned it keeps it. Small N tiles give one program per SM or more for a
    1536-wide layer. The defaults are the launch for up to BROADCAST_ROWS rows untuned."""

    block_n: int = 8  # output columns per program (tl.dot, above BROADCAST_ROWS rows: at least 16)
    block_k: int = 256  # reduction tile (tl.dot: at least 16)
    num_warps: int = 4
    num_stages: int = 3  # software pipelining depth of the K loop (Triton's default)


def default_config(rows: int) -> LaunchConfig:
    """The launch used untuned (off CUDA; a caller that passes none) for `rows` rows."""
    return LaunchConfig() if rows <= BROADCAST_ROWS else LaunchConfig(block_n=16, block_k=64)


def candidates(rows: int, width: int) -> list[LaunchConfig]:
    """The launches `tune` times for `rows` rows of a `width`-wide head. A few rows: the whole K in one tile
    or a few. tl.dot (16-64 rows): 16-64 columns (grid 96-24 programs at width 1536), pipelined 3-4 deep.
    The modulated kernel keeps num_stages rows x BLOCK_K tiles of h, scale and shift in shared memory: with
    32-64 rows a 256-wide K step does not fit the 227 KB of an H100/H200 SM, so it is tried up to 16 rows."""
    if rows <= BROADCAST_ROWS:
        tiles = [(n, k, w, 3) for n in (2, 4, 8, 16) for k in (256, 512, triton.next_power_of_2(width)) for w in (4, 8)]
    else:
        steps = (64, 128, 256) if rows <= 16 else (64, 128)
        tiles = [(n, k, w, s) for n in (16, 32, 64) for k in steps for w, s in ((4, 3), (4, 4), (8, 3))]
    return list(dict.fromkeys(LaunchConfig(*t) for t in tiles))


def _weights(linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(weight, scale, has scale) of an nn.Linear or a weight-only quantised one (QuantizedLinear: 1-byte
    weight, (N,) fp32 scale); a float weight passes itself as the unused scale pointer."""
    scale = getattr(linear, "scale", None)
    return linear.weight, linear.weight if scale is None else scale, scale is not None


def _pow2(n: int, dot: bool) -> int:
    """A tile's extent for n: the next power of two, at least 16 for tl.dot."""
    return max(triton.next_power_of_2(n), 16 if dot else 1)


def _launch_args(n: int, rows: int, config: LaunchConfig | None, pdl: bool) -> tuple[tuple[int], dict]:
    if rows > MAX_ROWS:
        raise ValueError(f"fused head kernels take at most {MAX_ROWS} rows, got {rows}")
    config = config or default_config(rows)
    dot = rows > BROADCAST_ROWS
    grid = (triton.cdiv(n, config.block_n),)
    meta = {"BLOCK_R": _pow2(rows, dot), "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "DOT": dot, "PDL": pdl}
    if os.environ.get("TRITON_INTERPRET") != "1":
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl)
    return grid, meta


def modulated_linear(
    x: torch.Tensor,
    ln: torch.nn.LayerNorm,
    scale1: torch.Tensor,
    shift: torch.Tensor,
    linear: torch.nn.Linear,
    *,
    silu: bool,
    config: LaunchConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """(silu)(linear(ln(x) * scale1 + shift)) for x, scale1, shift (R, K) -> (R, N) in x's dtype; config
    None: default_config(R); pdl: launched with programmatic dependent launch (pdl.py; SM90+)."""
    r, k = x.shape
    n = linear.out_features
    out = torch.empty(r, n, dtype=x.dtype, device=x.device)
    affine = ln.weight is not None
    grid, meta = _launch_args(n, r, config, pdl)
    weight, wscale, has_scale = _weights(linear)
    _modulated_linear[grid](
        x,
        ln.weight if affine else x,
        ln.bias if affine else x,
        scale1,
        shift,
        weight,
        wscale,
        linear.bias,
        out,
        r,
        k,
        n,
        ln.eps,
        HAS_AFFINE=affine,
        HAS_SCALE=has_scale,
        SILU=silu,
        K_POW2=triton.next_power_of_2(k),  # the whole-row load of a few rows (unused by tl.dot)
        **meta,
    )
    return out


def gated_linear(
    a: torch.Tensor,
    linear: torch.nn.Linear,
    gate: torch.Tensor,
    residual: torch.Tensor,
    *,
    config: LaunchConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """residual + gate * linear(a) for a (R, K), gate and residual (R, N) -> (R, N); pdl as in modulated_linear."""
    r, k = a.shape
    n = linear.out_features
    out = torch.empty(r, n, dtype=residual.dtype, device=a.device)
    grid, meta = _launch_args(n, r, config, pdl)
    weight, wscale, has_scale = _weights(linear)
    _gated_linear[grid](a, weight, wscale, linear.bias, gate, residual, out, r, k, n, HAS_SCALE=has_scale, **meta)
    return out


def velocity(
    net, x: torch.Tensor, mods: list[tuple], rows: int, *, config: LaunchConfig | None = None, pdl: bool = False
) -> torch.Tensor:
    """engine.head_velocity (net.trunk over the input projection) with fused kernels: (B, D) tokens and one
    step's modulations -> (rows * B, D) in the head's dtype. The input projection writes the guidance rows
    directly; each block is 2 kernels, the final layer 1. config None: default_config(rows * B); pdl: every
    kernel launched with programmatic dependent launch (pdl.py; SM90+)."""
    bsz, d = x.shape
    r = rows * bsz
    width = net.input_proj.out_features
    h = torch.empty(r, width, dtype=compute_dtype(net.input_proj), device=x.device)
    grid, meta = _launch_args(width, r, config, pdl)
    meta.pop("BLOCK_K")
    weight, wscale, has_scale = _weights(net.input_proj)
    k_pow2 = _pow2(d, meta["DOT"])
    _input_rows[grid](
        x, weight, wscale, net.input_proj.bias, h, bsz, r, d, width, HAS_SCALE=has_scale, K_POW2=k_pow2, **meta
    )
    for block, (shift, scale1, gate) in zip(net.res_blocks, mods, strict=False):
        act = modulated_linear(h, block.in_ln, scale1, shift, block.mlp[0], silu=True, config=config, pdl=pdl)
        h = gated_linear(act, block.mlp[2], gate, h, config=config, pdl=pdl)
    shift, scale1 = mods[-1]
    final = net.final_layer
    return modulated_linear(h, final.norm_final, scale1, shift, final.linear, silu=False, config=config, pdl=pdl)


def _graph_time(run, reps: int = 12) -> float:
    """GPU ms of `run` as the engine runs it: `reps` calls captured in one CUDA graph, so that Python's
    launch cost (larger than these kernels) does not decide the pick."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            run()
    return min(triton.testing.do_bench(graph.replay, warmup=2, rep=10) for _ in range(3)) / reps


def tune(net, rows: int, device: torch.device, *, persist: bool = True) -> LaunchConfig | None:
    """The fastest LaunchConfig on this GPU for this head width, weight format and row count: from the GPU's
    tuning cache on disk (nextstep.sampling.tuning), else by timing one block's two kernels (a few seconds)
    and stored there (persist=False: neither read nor stored). The caller keeps the result.
    default_config(rows) off CUDA; None when no candidate compiles on this GPU (the caller runs the torch head)."""
    if device.type != "cuda":
        return default_config(rows)
    linear = net.res_blocks[0].mlp[0]
    dtypes = (str(d).removeprefix("torch.") for d in (linear.weight.dtype, compute_dtype(linear)))
    key = entry_key(*dtypes, rows, linear.in_features)
    cache = TuningCache(torch.cuda.get_device_properties(device).name) if persist else None
    stored = cache.get("head", key, LaunchConfig) if cache else None
    if stored:
        return stored
    best = _fastest(net, rows, device)
    if cache and best is not None:
        cache.put("head", key, best)
    return best


def _fastest(net, rows: int, device: torch.device) -> LaunchConfig | None:
    """Time every candidate launch of one block's two kernels in CUDA graphs; the fastest (None: none ran)."""
    w = net.input_proj.out_features
    block = net.res_blocks[0]
    h = torch.randn(rows, w, device=device, dtype=compute_dtype(net.input_proj))
    ones, zeros = torch.ones_like(h), torch.zeros_like(h)
    best = None
    for config in candidates(rows, w):

        def run(config=config):
            a = modulated_linear(h, block.in_ln, ones, zeros, block.mlp[0], silu=True, config=config)
            return gated_linear(a, block.mlp[2], ones, h, config=config)

        try:
            ms = _graph_time(run)
        except Exception:  # noqa: BLE001 - a config the compiler rejects (registers, shared memory)
            continue
        if best is None or ms < best[0]:
            best = (ms, config)
    return None if best is None else best[1]
