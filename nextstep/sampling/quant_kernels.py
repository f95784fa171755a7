"""Triton kernel for weight-only fp8 (e4m3) / int8 linears at decode batch sizes, and the tuner that picks
its launch configuration per GPU and shape.

    y (M, N) = x (M, K) @ (W_q (N, K) * scale (N,)).T + bias        M <= MAX_ROWS (batch x guidance rows)

W_q is read from HBM as 1 byte per weight and converted to x's dtype in registers (exact: e4m3 and int8
values are representable in bf16/fp16); the product runs on tensor cores (`tl.dot`, rows padded to 16)
with fp32 accumulation, and the per-channel scale is applied to the output columns once. Memory bound, so
each weight byte is read once per call and the grid is (column tiles, K splits): small layers split K
into fp32 partials summed by a second kernel (deterministic, unlike atomics) to fill the SMs.
The definition is `quantize.reference_linear`; tests also run this kernel in Triton's CPU interpreter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nextstep.sampling.tuning import TuningCache, entry_key

try:
    import triton
    import triton.language as tl

    from nextstep.sampling.pdl import wait_previous
except ImportError:  # the CPU install has no Triton; QuantizedLinear then runs the reference
    triton = None

MAX_ROWS = 64  # rows per call; more rows (prefill) are compute bound and use the reference (cuBLAS)
# The interpreter stores bf16 as uint16 and multiplies those bits in tl.dot: there the dot runs in fp32
# (the same products: both operands are exact in fp32).
_DOT_F32 = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """The kernel serves x (M, K): Triton present, a CUDA tensor in bf16/fp16, at most MAX_ROWS rows."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= MAX_ROWS


@dataclass(frozen=True)
class LaunchConfig:
    """One launch of the kernel: a program owns block_n output columns and one of split_k slices of K."""

    block_n: int  # output columns per program
    block_k: int  # K step of the inner loop
    split_k: int  # K slices (programs per column tile); > 1 adds the partial-sum kernel
    num_warps: int
    num_stages: int  # software-pipelined loads in flight


if triton is not None:

    @triton.jit
    def _load_x(x_ptrs, rmask, ks, K: tl.constexpr, EVEN_K: tl.constexpr):
        """The x tile (BLOCK_M, BLOCK_K) at x_ptrs, rows rmask and K step ks; zero outside."""
        if EVEN_K:
            return tl.load(x_ptrs, mask=rmask[:, None], other=0.0)
        else:
            return tl.load(x_ptrs, mask=rmask[:, None] & (ks < K)[None, :], other=0.0)

    @triton.jit
    def _load_w(w_ptrs, nmask, ks, K: tl.constexpr, EVEN_K: tl.constexpr):
        """The W_q.T tile (BLOCK_K, BLOCK_N) at w_ptrs, columns nmask and K step ks; zero outside."""
        if EVEN_K:
            return tl.load(w_ptrs, mask=nmask[None, :], other=0.0)
        else:
            return tl.load(w_ptrs, mask=nmask[None, :] & (ks < K)[:, None], other=0.0)

    @triton.jit
    def _dot(x, w, DOT_F32: tl.constexpr):
        """x (BLOCK_M, BLOCK_K) @ W_q.T tile (BLOCK_K, BLOCK_N) -> fp32, the weight converted to x's dtype."""
        if DOT_F32:
            return tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            return tl.dot(x, w.to(tl.float32).to(x.dtype))  # the dequantisation, in registers

    @triton.jit
    def _quant_linear(
        x_ptr,  # (M, K) activations, bf16/fp16
        w_ptr,  # (N, K) float8_e4m3fn or int8 weight
        scale_ptr,  # (N,) float32 per-channel scale
        b_ptr,  # (N,) bias (unused without HAS_BIAS)
        out_ptr,  # (M, N) in x's dtype; (SPLIT_K, M, N) float32 partials when SPLIT_K > 1
        M,
        N,
        K: tl.constexpr,  # loop bounds are constexpr: the interpreter needs ints (NumPy >= 2.5)
        K_SPLIT: tl.constexpr,  # K columns per slice, a multiple of BLOCK_K
        EVEN_K: tl.constexpr,  # K == SPLIT_K * K_SPLIT: no K mask
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (pdl.py): the first weight tile loads before the wait
    ):
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        if PDL:
            ks = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)
            w_first = _load_w(w_ptr + cols[None, :] * K + ks[:, None], nmask, ks, K, EVEN_K)
        wait_previous(PDL)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if PDL:  # the first K step with the weight tile loaded before the wait
            acc += _dot(_load_x(x_ptr + rows[:, None] * K + ks[None, :], rmask, ks, K, EVEN_K), w_first, DOT_F32)
        for k0 in range(PDL * BLOCK_K, K_SPLIT, BLOCK_K):
            ks = pid_k * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]
            w_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N): W_q.T
            x = _load_x(x_ptrs, rmask, ks, K, EVEN_K)
            acc += _dot(x, _load_w(w_ptrs, nmask, ks, K, EVEN_K), DOT_F32)
        acc *= tl.load(scale_ptr + cols, mask=nmask, other=0.0)[None, :]
        offs = rows[:, None] * N + cols[None, :]
        omask = rmask[:, None] & nmask[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(out_ptr + pid_k * M * N + offs, acc, mask=omask)

    @triton.jit
    def _sum_splits(
        part_ptr,  # (SPLIT_K, M, N) float32
        b_ptr,  # (N,) bias (unused without HAS_BIAS)
        out_ptr,  # (M, N)
        MN,
        N,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,  # as in _quant_linear; nothing to load before the wait
    ):
        wait_previous(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * MN + offs, mask=m, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: LaunchConfig,
    out: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """x (M, K) contiguous @ dequantised weight (N, K).T + bias -> (M, N) in x's dtype (written into `out`);
    pdl: the kernels launched with programmatic dependent launch (pdl.py; SM90+)."""
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    c = config
    k_split = triton.cdiv(triton.cdiv(k, c.split_k), c.block_k) * c.block_k
    target = out if c.split_k == 1 else torch.empty(c.split_k, m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    _quant_linear[(triton.cdiv(n, c.block_n), c.split_k)](
        x,
        weight,
        scale,
        bias if has_bias else scale,
        target,
        m,
        n,
        K=k,
        K_SPLIT=k_split,
        EVEN_K=k == k_split * c.split_k,
        HAS_BIAS=has_bias,
        SPLIT_K=c.split_k,
        DOT_F32=_DOT_F32,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        PDL=pdl,
        launch_pdl=pdl,
    )
    if c.split_k > 1:
        block = 1024
        split = {"HAS_BIAS": has_bias, "SPLIT_K": c.split_k, "BLOCK": block, "PDL": pdl, "launch_pdl": pdl}
        _sum_splits[(triton.cdiv(m * n, block),)](target, bias if has_bias else scale, out, m * n, n, **split)
    return out


def row_bucket(m: int) -> int:
    """Rows up to 16 share one kernel (tl.dot pads them to 16); then powers of two up to MAX_ROWS."""
    return max(16, 1 << (m - 1).bit_length())


# (block_n, block_k, num_warps, num_stages) tried per shape, by row bucket; split_k follows from the SM
# count. Memory bound: each tile streams 8-32 KB of weight per pipeline stage; with 32-64 rows the
# activation tile (rows x block_k bf16) grows too, so wider N tiles and shorter K steps are tried.
_TILES = {
    16: ((16, 512, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 4), (64, 512, 8, 3)),
    32: ((32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3)),
}
_TILES[64] = _TILES[32]
_DEFAULT = 1  # index of the tile used untimed during CUDA-graph capture


def _split_for(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Fewest K slices (1, 2, 4, 8) that give every SM a program, keeping at least two K steps per slice."""
    split = 1
    while triton.cdiv(n, block_n) * split < sms and k >= 4 * split * block_k and split < 8:
        split *= 2
    return split


def _config(tile: tuple[int, int, int, int], n: int, k: int, sms: int) -> LaunchConfig:
    block_n, block_k, warps, stages = tile
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))  # no K step wider than K itself
    return LaunchConfig(block_n, block_k, _split_for(n, k, block_n, block_k, sms), warps, stages)


def default_config(n: int, k: int, m: int, sms: int) -> LaunchConfig:
    """The configuration used without timing (inside a CUDA-graph capture) for m rows."""
    return _config(_TILES[row_bucket(m)][_DEFAULT], n, k, sms)


def candidates(n: int, k: int, bucket: int, sms: int) -> list[LaunchConfig]:
    """The launch configurations the tuner times for an (N, K) weight, `bucket` rows, `sms` SMs."""
    out = []
    for tile in _TILES[bucket]:
        config = _config(tile, n, k, sms)
        if config not in out:
            out.append(config)
    return out


class Tuner:
    """Launch configuration per (GPU name, weight dtype, row bucket, N, K), kept in `table`: read from the
    GPU's tuning cache on disk (nextstep.sampling.tuning), else chosen by timing the candidates on the first
    call with that key (outside CUDA-graph capture) and stored there. persist=False: memory only."""

    def __init__(self, *, persist: bool = True):
        self.table: dict[tuple[str, str, int, int, int], LaunchConfig] = {}
        self.persist = persist
        self._disk: dict[str, TuningCache] = {}  # by GPU name, read on first use

    def config(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> LaunchConfig:
        """The configuration of quant_linear(x, weight, scale, bias) for x (M, K) on x's GPU; times the
        candidates (with these operands, so the kernels compiled are the ones then used) if new."""
        n, k = weight.shape
        props = torch.cuda.get_device_properties(x.device)
        key = (props.name, str(weight.dtype).removeprefix("torch."), row_bucket(x.shape[0]), n, k)
        if key in self.table:
            return self.table[key]
        disk = self._cache(props.name)
        stored = disk.get("quant_linear", entry_key(*key[1:]), LaunchConfig) if disk else None
        if stored:
            self.table[key] = stored
            return stored
        sms = props.multi_processor_count
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: a fair default, not kept
            return default_config(n, k, x.shape[0], sms)
        rows = torch.randn(key[2], k, dtype=x.dtype, device=x.device)  # (bucket, K)
        self.table[key] = _fastest(candidates(n, k, key[2], sms), rows, weight, scale, bias)
        if disk:
            disk.put("quant_linear", entry_key(*key[1:]), self.table[key])
        return self.table[key]

    def _cache(self, gpu: str) -> TuningCache | None:
        if not self.persist:
            return None
        if gpu not in self._disk:
            self._disk[gpu] = TuningCache(gpu)
        return self._disk[gpu]


def _fastest(found: list[LaunchConfig], x, weight, scale, bias) -> LaunchConfig:
    """The candidate with the least median time (L2 flushed before each call, as triton.testing.do_bench
    does, so weights come from HBM as they do in a decode step)."""
    best = None
    for config in found:
        try:
            ms = triton.testing.do_bench(
                lambda c=config: quant_linear(x, weight, scale, bias, config=c), warmup=5, rep=25
            )
        except triton.runtime.errors.OutOfResources:  # shared memory or registers of this GPU exceeded
            continue
        if best is None or ms < best[0]:
            best = (ms, config)
    return best[1]
