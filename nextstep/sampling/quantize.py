"""Weight-only int8/fp8 quantisation of the decoder layers and the flow head, applied from outside the model.

apply_quantization(model, "int8")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.model.nextstep import NextStep

QUANTIZE = ("none", "int8", "fp8")


class QuantLinear(nn.Module):
    """Linear with int8 or fp8 (e4m3) weights and one scale per output channel; dequantised per call.

    Halves weight memory. Without a fused dequant-GEMM kernel it does not cut bytes moved per call.
    """

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        if mode == "int8":
            scale = amax / 127
            q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        else:
            scale = amax / torch.finfo(torch.float8_e4m3fn).max
            q = (w / scale).to(torch.float8_e4m3fn)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale[:, 0].to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return out if self.bias is None else out + self.bias


def apply_quantization(model: NextStep, mode: str) -> NextStep:
    """Swap the decoder layers' and the flow head's linears for weight-only int8/fp8 ones, in place."""
    if mode not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {mode!r}")
    if mode == "none":
        return model
    for layer in model.layers:  # fuse_projections' copies would bypass the quantised weights
        layer.self_attn.qkv_weight = layer.self_attn.qkv_bias = layer.mlp.gate_up_weight = None
    for root in (model.layers, model.image_head.net):
        for module in list(root.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, QuantLinear(child, mode))
    return model
