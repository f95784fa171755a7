"""Triton kernels for a decoder layer's decode step (one query token per row), and `decode_layer`, which runs a
backbone DecoderLayer with them: four small kernels between its GEMVs instead of ~30 eager ones.

    h = rms_norm(x)                                    1 kernel (RMSNorm.forward's fp32 norm, cast, weight)
    q, k, v = qkv_proj(h); rope_cache(q, k, v, ...)    1 kernel: rotary on q and k, k and v into the cache
    a = sdpa(q, cache) ; x, h = add_rms_norm(x, o_proj(a))     1 kernel: residual add + RMSNorm
    x = x + down_proj(silu_mul(gate_up_proj(h)))       1 kernel: silu(gate) * up

The eager modules (nextstep.model.backbone) are the definition: each kernel rounds where the eager ops round
(bf16 products, the cast after the fp32 norm), so on CUDA the result is the eager layer's within fp32 ordering.
The projections are the layer's own modules (FusedLinear, nn.Linear or QuantizedLinear), attention is the
eager decode branch's F.scaled_dot_product_attention over the cache. `decode_layer` is an engine `layer_fn`
(`Engine(layer_kernels=True)`); tests run the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nextstep.model.backbone import KVCache, RMSNorm

try:
    import triton
    import triton.language as tl

    from nextstep.sampling.pdl import wait_previous
except ImportError:  # the CPU install has no Triton; decode_layer then runs the eager layer
    triton = None


def available(device: torch.device) -> bool:
    """Triton present and a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1, the tests)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _rms_norm(
        x_ptr,  # (R, N) input; with HAS_RES the residual stream
        res_ptr,  # (R, N) added to x (unused without HAS_RES)
        w_ptr,  # (N,) norm weight
        sum_ptr,  # (R, N) x + res, rounded to its dtype (unused without HAS_RES)
        out_ptr,  # (R, N) weight * norm(x [+ res])
        N,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (pdl.py): the norm weight loads before the wait
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        if PDL:
            w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        wait_previous(PDL)
        x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        norm_ty = sum_ptr.dtype.element_ty  # the dtype the norm's input has (x's without HAS_RES)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
            x = x.to(norm_ty)  # the eager residual add rounds here
            tl.store(sum_ptr + row * N + cols, x, mask=m)
            x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = (x * rstd).to(norm_ty).to(tl.float32)  # F.rms_norm in fp32, cast back to the input's dtype
        if not PDL:
            w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (w * y).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache(
        q_ptr,  # (R, H * D) queries, row stride q_stride
        k_ptr,  # (R, Hkv * D) keys, row stride k_stride
        v_ptr,  # (R, Hkv * D) values, row stride v_stride
        cos_ptr,  # (R, D) rotary tables, row stride cs_stride
        sin_ptr,
        slot_ptr,  # (1,) int64 cache slot of this token
        qo_ptr,  # (R, H, D) rotated queries
        kc_ptr,  # (R, Hkv, L_MAX, D) key cache
        vc_ptr,  # (R, Hkv, L_MAX, D) value cache
        q_stride,
        k_stride,
        v_stride,
        cs_stride,
        L_MAX,
        H: tl.constexpr,
        HKV: tl.constexpr,
        HALF: tl.constexpr,  # D / 2
        BLOCK: tl.constexpr,  # HALF rounded up to a power of two
        PDL: tl.constexpr,  # as in _rms_norm; waits first (the tables and slot are this step's, the cache is read)
    ):
        """One program per (row, head) over the H query heads then the Hkv key heads: x * cos + rotate_half(x)
        * sin (backbone.apply_rope, each product rounded); a key head also copies its value head."""
        wait_previous(PDL)
        row = tl.program_id(0)
        head = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        c1 = tl.load(cos_ptr + row * cs_stride + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + row * cs_stride + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + row * cs_stride + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + row * cs_stride + HALF + i, mask=m, other=0.0).to(tl.float32)
        ty = qo_ptr.dtype.element_ty  # the rotated keys' dtype too (rope_cache checks the cache has it)
        if head < H:
            src = q_ptr + row * q_stride + head * 2 * HALF
            dst = qo_ptr + (row * H + head) * 2 * HALF
        else:
            j = head - H
            slot = tl.load(slot_ptr)
            src = k_ptr + row * k_stride + j * 2 * HALF
            dst = kc_ptr + ((row * HKV + j) * L_MAX + slot) * 2 * HALF
            vsrc = v_ptr + row * v_stride + j * 2 * HALF
            vdst = vc_ptr + ((row * HKV + j) * L_MAX + slot) * 2 * HALF
            tl.store(vdst + i, tl.load(vsrc + i, mask=m), mask=m)
            tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i, mask=m), mask=m)
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        # Each product rounded to the dtype as the eager ops round it; rotate_half(x) = (-x2, x1).
        o1 = (x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)
        o2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
        tl.store(dst + i, o1.to(ty), mask=m)
        tl.store(dst + HALF + i, o2.to(ty), mask=m)

    @triton.jit
    def _silu_mul(
        g_ptr,  # (R, F) gate, row stride g_stride
        u_ptr,  # (R, F) up, row stride u_stride
        out_ptr,  # (R, F)
        g_stride,
        u_stride,
        F,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,  # as in _rms_norm; nothing to load before the wait
    ):
        wait_previous(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < F
        g = tl.load(g_ptr + row * g_stride + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)  # F.silu's formula and rounding
        tl.store(out_ptr + row * F + cols, (s * u).to(out_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) -> (B, N), a view where strides allow; unit stride along N."""
    t = t.reshape(t.shape[0], -1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(block: int, pdl: bool) -> dict:
    # The interpreter ignores launch options; on GPU about 16 elements per thread.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"PDL": pdl}
    return {"PDL": pdl, "num_warps": min(16, max(1, block // 512)), "launch_pdl": pdl}


def _norm(x: torch.Tensor, res: torch.Tensor | None, norm: RMSNorm, pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x)
    r, n = rows.shape
    total = rows if res is None else torch.empty(r, n, dtype=torch.result_type(x, res), device=x.device)
    out = torch.empty(r, n, dtype=torch.result_type(norm.weight, total), device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm[(r,)](
        rows,
        rows if res is None else _rows(res),
        norm.weight,
        total,
        out,
        n,
        norm.eps,
        HAS_RES=res is not None,
        BLOCK=block,
        **_launch(block, pdl),
    )
    return total.view(x.shape), out.view(x.shape)


def rms_norm(x: torch.Tensor, norm: RMSNorm, *, pdl: bool = False) -> torch.Tensor:
    """norm(x) for x (B, 1, d) as one kernel; pdl: launched with programmatic dependent launch (pdl.py; SM90+)."""
    return _norm(x, None, norm, pdl)[1]


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, norm: RMSNorm, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, norm(x + a)) for x, a (B, 1, d) as one kernel; pdl as in rms_norm."""
    return _norm(x, a, norm, pdl)


def rope_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    slots: torch.Tensor,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """One decode token's q (B, 1, H*D), k, v (B, 1, Hkv*D): apply_rope to q and k, and k, v written into the
    cache at slots (1,) (KVCache.update) -> rotated q (B, H, D). cos, sin: (B, 1, 1, D) or broadcastable;
    pdl as in rms_norm."""
    b, hkv, l_max, d = cache.k.shape
    h = q.shape[-1] // d
    q2, k2, v2 = _rows(q), _rows(k), _rows(v)
    cos2, sin2 = (_rows(t.expand(b, 1, 1, d)) for t in (cos, sin))
    if cos2.stride(0) != sin2.stride(0):
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    out = torch.empty(b, h, d, dtype=torch.result_type(q, cos), device=q.device)
    if cache.k.dtype != out.dtype:
        raise ValueError(f"rope_cache writes {out.dtype} keys, the cache holds {cache.k.dtype}")
    half = d // 2
    block = triton.next_power_of_2(half)
    _rope_cache[(b, h + hkv)](
        q2,
        k2,
        v2,
        cos2,
        sin2,
        slots,
        out,
        cache.k,
        cache.v,
        q2.stride(0),
        k2.stride(0),
        v2.stride(0),
        cos2.stride(0),
        l_max,
        H=h,
        HKV=hkv,
        HALF=half,
        BLOCK=block,
        **_launch(block, pdl),
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """F.silu(gate) * up for gate, up (B, 1, F) (views of one gate_up output or two tensors) as one kernel; pdl as
    in rms_norm."""
    g2, u2 = _rows(gate), _rows(up)
    r, f = g2.shape
    out = torch.empty(r, f, dtype=torch.result_type(gate, up), device=gate.device)
    block = min(1024, triton.next_power_of_2(f))
    _silu_mul[(r, triton.cdiv(f, block))](
        g2, u2, out, g2.stride(0), u2.stride(0), f, BLOCK=block, **_launch(block, pdl)
    )
    return out.view(gate.shape)


def serves(layer, x: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None, slots: torch.Tensor | None) -> bool:
    """Whether decode_layer runs `layer` on x with kernels: one query token per row, a KV cache for these rows,
    a mask and one slot, cache and rotary tables in x's dtype, an even head_dim, Triton able to run on x's device."""
    cache = layer.self_attn.cache
    return (
        available(x.device)
        and x.dim() == 3
        and x.shape[1] == 1
        and cache is not None
        and cache.k.shape[0] == x.shape[0]
        and cache.k.dtype == x.dtype == cos.dtype
        and mask is not None
        and slots is not None
        and slots.numel() == 1
        and layer.self_attn.head_dim % 2 == 0
    )


def decode_layer(layer, x, cos, sin, mask, slots=None, *, pdl: bool = False):
    """DecoderLayer.forward(x, cos, sin, mask, slots) for a decode step, x (B, 1, d) -> (B, 1, d), with the
    fused kernels around the layer's own projections; what it does not serve (see `serves`) runs
    layer.forward. pdl: the fused kernels launched with programmatic dependent launch (pdl.py; SM90+)."""
    if not serves(layer, x, cos, mask, slots):
        return layer.forward(x, cos, sin, mask, slots)
    attn, mlp = layer.self_attn, layer.mlp
    b = x.shape[0]
    h, hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    normed = rms_norm(x, layer.input_layernorm, pdl=pdl)
    if attn.qkv_proj is None:
        q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
    else:
        q, k, v = attn.qkv_proj(normed).split([h * hd, hkv * hd, hkv * hd], dim=-1)
    q = rope_cache(q, k, v, cos, sin, attn.cache, slots, pdl=pdl)  # (B, H, D)
    kv = mask.shape[-1]
    keys, values = attn.cache.k[:, :, :kv], attn.cache.v[:, :, :kv]  # (B, Hkv, Lk, D)
    # Attention.forward's decode branch: the H / Hkv query heads of a KV head as queries against it.
    out = F.scaled_dot_product_attention(q.view(b, hkv, h // hkv, hd), keys, values, attn_mask=mask)
    x, normed = add_rms_norm(x, attn.o_proj(out.reshape(b, 1, h * hd)), layer.post_attention_layernorm, pdl=pdl)
    if mlp.gate_up_proj is None:
        gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
    else:
        gate, up = mlp.gate_up_proj(normed).chunk(2, dim=-1)
    return x + mlp.down_proj(silu_mul(gate, up, pdl=pdl))
