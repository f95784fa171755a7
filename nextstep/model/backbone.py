"""Qwen2/Llama decoder blocks: RMSNorm, rotary embeddings, GQA attention with a static KV cache, SwiGLU.

Parameter names follow Hugging Face Qwen2 (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...)
so official checkpoints load with no renaming. Numerics follow HF: norms and RoPE tables in fp32.
One forward serves training, prefill and decode (gpt-fast's pattern); `fuse_projections` adds the
inference-time fused q/k/v and gate/up projections (`qkv_proj`, `gate_up_proj`, outside the state_dict).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.model.config import NextStepConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's arithmetic (fp32 norm, cast, then weight) with the fused norm: 4 kernels instead of 8.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF default rotary tables for integer positions (B, L) -> cos, sin (B, 1, L, D)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def build_attention_mask(key_valid: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, Lq, Lk): causal over positions and blind to invalid (pad) keys.

    A query always sees its own key, so left-pad rows (no valid key yet) stay finite, as HF's
    SDPA path arranges; their outputs are meaningless and never read.
    key_valid: (B, Lk) bool; q_pos: (Lq,) and k_pos: (Lk,) cache slots.
    """
    causal = k_pos[None, :] <= q_pos[:, None]  # (Lq, Lk)
    own = k_pos[None, :] == q_pos[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]


class KVCache(nn.Module):
    """Pre-allocated keys and values for one layer: (B, Hkv, Lmax, D) each."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype, device):
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, L, D) at cache slots (L,) and return the whole cache."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: NextStepConfig):
        super().__init__()
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.o_attention_bias)
        self.cache: KVCache | None = None
        self.qkv_proj: nn.Module | None = None  # d -> (H + 2 Hkv) D, from fuse_projections (or a quantised one)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = q.view(b, n, h, hd).transpose(1, 2)  # (B, H, L, D)
        k = k.view(b, n, hkv, hd).transpose(1, 2)  # (B, Hkv, L, D)
        v = v.view(b, n, hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(slots, k, v)  # (B, Hkv, Lmax, D)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]  # only the slots the mask covers
        if n == 1 and hkv != h:
            # Decode: the `rep` query heads of one KV head become `rep` queries against it, so K and V
            # are read once instead of being repeated (mask (B, 1, 1, Lk) broadcasts over them).
            out = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, hd), k, v, attn_mask=mask)
            return self.o_proj(out.reshape(b, 1, h * hd))
        if hkv != h:
            k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: NextStepConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # d -> 2f, from fuse_projections (or a quantised one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: NextStepConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class FusedLinear(nn.Module):
    """F.linear over weights concatenated from several linears, held as non-persistent buffers: an
    inference copy that adds nothing to the state_dict."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.register_buffer("weight", torch.cat([lin.weight.detach() for lin in linears]), persistent=False)
        bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fuse_projections(layers: nn.ModuleList) -> bool:
    """Give each layer a `FusedLinear` for q/k/v and one for gate/up, so inference runs one GEMM instead of
    three (two). The parameters (and state_dict) are untouched; the fused copies cost their memory again
    and are stale once the weights change: calling this again refreshes them in place (the same storage, so
    CUDA graphs captured over them stay valid).

    False, and nothing changed, when the layers hold other modules (quantised: see
    nextstep.sampling.quantize.fuse_quantized) or an MLP bias.
    """
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
        if any(type(lin) is not nn.Linear for lin in linears) or m.gate_proj.bias is not None:
            return False
    with torch.no_grad():
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_proj = _refreshed(a.qkv_proj, [a.q_proj, a.k_proj, a.v_proj])
            m.gate_up_proj = _refreshed(m.gate_up_proj, [m.gate_proj, m.up_proj])
    return True


def _refreshed(fused: nn.Module | None, linears: list[nn.Linear]) -> FusedLinear:
    # The new weights copied into the FusedLinear already there when its tensors match, so graphs that read
    # them see the new weights; else a new one.
    new = FusedLinear(linears)
    if not isinstance(fused, FusedLinear):
        return new
    pairs = [(fused.weight, new.weight), (fused.bias, new.bias)]
    if any((old is None) != (value is None) for old, value in pairs):
        return new
    pairs = [(old, value) for old, value in pairs if old is not None]
    if any((old.shape, old.dtype, old.device) != (value.shape, value.dtype, value.device) for old, value in pairs):
        return new
    for old, value in pairs:
        old.copy_(value)
    return fused
