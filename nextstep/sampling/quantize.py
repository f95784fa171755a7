"""Weight-only fp8 (e4m3) / int8 quantisation with one float32 scale per output channel: the math
(quantise, dequantise), the reference linear that defines the result, and `QuantizedLinear`, which runs
that linear with the fused Triton kernel (`quant_kernels`) on CUDA and as the reference elsewhere.

    layer = quantize_linear(nn.Linear(5120, 5120), "fp8")      # weight (N, K) float8_e4m3fn, scale (N,)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.sampling import quant_kernels

MODES = ("fp8", "int8")
_DTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
# Largest magnitude stored: e4m3's finite max; int8 symmetric (-128 unused, so -q is representable).
_QMAX = {"fp8": 448.0, "int8": 127.0}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantisation mode must be one of {', '.join(MODES)}, got {mode!r}")


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (W_q (N, K) fp8/int8, scale (N,) float32) with W_q * scale[:, None] ~ weight.

    Per-output-channel absmax: the largest |w| of each row maps to the format's max. An all-zero row gets
    scale 1 and W_q 0 (no division by zero). int8 rounds half to even; the e4m3 cast rounds to nearest.
    """
    _check_mode(mode)
    w = weight.detach().float()
    qmax = _QMAX[mode]
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp(-qmax, qmax)  # clamp: the e4m3 cast turns out-of-range values into NaN
    if mode == "int8":
        q = q.round()
    return q.to(_DTYPE[mode]), scale


def dequantize_weight(weight_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_q (N, K), scale (N,) -> W_q * scale[:, None] (N, K) in `dtype`."""
    return (weight_q.float() * scale[:, None]).to(dtype)


def reference_linear(
    x: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The definition: dequantise to x's dtype, then F.linear. x (..., K) -> (..., N)."""
    return F.linear(x, dequantize_weight(weight_q, scale, x.dtype), bias)


class QuantizedLinear(nn.Module):
    """y = x @ (weight * scale[:, None]).T + bias with weight (N, K) fp8/int8 and scale (N,) float32.

    Decode batches (at most quant_kernels.MAX_ROWS rows) on CUDA run the fused kernel, which reads the
    weight as 1 byte per entry; other inputs run `reference_linear`. Quantise after moving the model to its
    dtype: `Module.to(dtype)` converts every floating buffer, float8 weights and float32 scales included.
    """

    def __init__(
        self,
        weight_q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        tuner: quant_kernels.Tuner | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight", weight_q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias)
        # Launch configurations, shared by all layers that `quantize_linear` was given the same tuner for.
        self.tuner = quant_kernels.Tuner() if tuner is None else tuner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if not quant_kernels.available(rows):
            return reference_linear(x, self.weight, self.scale, self.bias)
        rows = rows.contiguous()
        config = self.tuner.config(rows, self.weight, self.scale, self.bias)
        y = quant_kernels.quant_linear(rows, self.weight, self.scale, self.bias, config=config)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


def quantize_linear(linear: nn.Linear, mode: str, *, tuner: quant_kernels.Tuner | None = None) -> QuantizedLinear:
    """A QuantizedLinear computing what `linear` computes, with its weight quantised per output channel
    (mode "fp8" or "int8"); bias kept in the linear's dtype. Pass one `tuner` to every layer of a model so
    layers of one shape share their tuned launch configuration."""
    weight_q, scale = quantize_weight(linear.weight, mode)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return QuantizedLinear(weight_q, scale, bias, tuner=tuner)


def quantize_linears(root: nn.Module, mode: str, *, tuner: quant_kernels.Tuner) -> int:
    """Replace every nn.Linear below `root` by quantize_linear(..., tuner=tuner), in place; the count."""
    _check_mode(mode)
    count = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, quantize_linear(child, mode, tuner=tuner))
                count += 1
    return count


def concat_quantized(layers: list[QuantizedLinear]) -> QuantizedLinear:
    """One QuantizedLinear whose output is the layers' outputs side by side (fused q/k/v or gate/up): with
    per-output-channel scales this is a concatenation of rows."""
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("concat_quantized needs all layers with a bias or all without")
    bias = None if biases[0] is None else torch.cat(biases)
    weight = torch.cat([layer.weight for layer in layers])
    return QuantizedLinear(weight, torch.cat([layer.scale for layer in layers]), bias, tuner=layers[0].tuner)
