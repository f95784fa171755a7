"""Weight-only fp8 (e4m3) / int8 quantisation with one float32 scale per output channel: the math
(quantise, dequantise), the reference linear that defines the result, and `QuantizedLinear`, which runs
that linear with the fused Triton kernel (`quant_kernels`) on CUDA and as the reference elsewhere.

    layer = quantize_linear(nn.Linear(5120, 5120), "fp8")      # weight (N, K) float8_e4m3fn, scale (N,)
    apply_quantization(model, "fp8")                           # every decoder, projector and head linear
    fuse_quantized(model.layers)                               # q/k/v and gate/up as one kernel each (Engine)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.model.nextstep import NextStep
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
    # Divided by a tensor, not a Python number: CUDA divides by a number as a product with its float32
    # reciprocal (an ulp off for a third of the rows), so a checkpoint quantised on CPU would differ from the
    # same weights quantised at load on CUDA.
    scale = torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))
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
        compute_dtype: torch.dtype | None = None,
        persistent: bool = True,
    ):
        super().__init__()
        # The dtype inputs arrive in (the original linear's weight dtype; model code reads it, not `weight`).
        self.compute_dtype = compute_dtype or (torch.bfloat16 if bias is None else bias.dtype)
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        # persistent=False: an inference-time fused copy (fuse_quantized) that adds nothing to the state_dict.
        self.register_buffer("weight", weight_q, persistent=persistent)
        self.register_buffer("scale", scale.float(), persistent=persistent)
        self.register_buffer("bias", bias, persistent=persistent)
        # Launch configurations, shared by all layers that `quantize_linear` was given the same tuner for.
        self.tuner = quant_kernels.Tuner() if tuner is None else tuner
        self.pdl = False  # kernels launched with programmatic dependent launch (set_pdl; Engine(pdl=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if not quant_kernels.available(rows):
            return reference_linear(x, self.weight, self.scale, self.bias)
        rows = rows.contiguous()
        config = self.tuner.config(rows, self.weight, self.scale, self.bias)
        y = quant_kernels.quant_linear(rows, self.weight, self.scale, self.bias, config=config, pdl=self.pdl)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


def quantize_linear(linear: nn.Linear, mode: str, *, tuner: quant_kernels.Tuner | None = None) -> QuantizedLinear:
    """A QuantizedLinear computing what `linear` computes, with its weight quantised per output channel
    (mode "fp8" or "int8"); bias kept in the linear's dtype. Pass one `tuner` to every layer of a model so
    layers of one shape share their tuned launch configuration."""
    weight_q, scale = quantize_weight(linear.weight, mode)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return QuantizedLinear(weight_q, scale, bias, tuner=tuner, compute_dtype=linear.weight.dtype)


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


def concat_quantized(layers: list[QuantizedLinear], *, persistent: bool = True) -> QuantizedLinear:
    """One QuantizedLinear whose output is the layers' outputs side by side (fused q/k/v or gate/up): with
    per-output-channel scales this is a concatenation of rows."""
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("concat_quantized needs all layers with a bias or all without")
    bias = None if biases[0] is None else torch.cat(biases)
    weight = torch.cat([layer.weight for layer in layers])
    scale = torch.cat([layer.scale for layer in layers])
    fused = QuantizedLinear(
        weight, scale, bias, tuner=layers[0].tuner, compute_dtype=layers[0].compute_dtype, persistent=persistent
    )
    fused.pdl = layers[0].pdl  # launched as its parts are
    return fused


def set_pdl(root: nn.Module, pdl: bool) -> None:
    """Every QuantizedLinear below `root` launches its kernels with programmatic dependent launch (pdl.py) or
    without; fused ones made later (fuse_quantized) follow their parts."""
    for module in root.modules():
        if isinstance(module, QuantizedLinear):
            module.pdl = pdl


def _fuse(layers: list[QuantizedLinear]) -> QuantizedLinear:
    """concat_quantized outside the state_dict, with each layer's buffers then made views of its rows: the
    fused weight costs no memory again (1-byte weights: the fp8 model's peak stays the model's size), and
    load_state_dict into the layers writes through to it."""
    fused = concat_quantized(layers, persistent=False)
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)  # contiguous row blocks: views the kernel reads as is
        layer.weight, layer.scale = fused.weight[rows], fused.scale[rows]
        if fused.bias is not None:
            layer.bias = fused.bias[rows]
        start += layer.out_features
    return fused


def _is_fused(fused: nn.Module | None, layers: list[QuantizedLinear]) -> bool:
    """Whether `fused` is _fuse(layers) and still their memory (`.to()` or an assigning load copies them apart)."""
    if not isinstance(fused, QuantizedLinear):
        return False
    start = 0
    for layer in layers:
        for name in ("weight", "scale", "bias"):
            part, whole = getattr(layer, name), getattr(fused, name)
            if part is not None and (whole is None or part.data_ptr() != whole[start].data_ptr()):
                return False
        start += layer.out_features
    return True


def fuse_quantized(layers: nn.ModuleList) -> bool:
    """The quantised counterpart of backbone.fuse_projections: each layer's q/k/v and gate/up
    QuantizedLinears run as one kernel each (`self_attn.qkv_proj`, `mlp.gate_up_proj`); official names and
    the state_dict unchanged. Idempotent; fuses again where the layers' memory was copied apart. False, and
    nothing changed, unless all five are QuantizedLinears of one weight format and (for gate/up) bias-free."""
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
        if any(type(lin) is not QuantizedLinear for lin in linears) or m.gate_proj.bias is not None:
            return False
        if len({lin.weight.dtype for lin in linears}) != 1:
            return False
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        qkv, gate_up = [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]
        if not _is_fused(a.qkv_proj, qkv):
            a.qkv_proj = _fuse(qkv)
        if not _is_fused(m.gate_up_proj, gate_up):
            m.gate_up_proj = _fuse(gate_up)
    return True


QUANTIZE = ("none", *MODES)  # what `--quantize` and `nextstep.load(quantize=...)` take


def apply_quantization(model: NextStep, mode: str) -> NextStep:
    """Swap the decoder layers', projectors' and flow head's linears for weight-only fp8/int8 ones, in
    place, all sharing one launch tuner. Run it after the model has its device and dtype. The engine then
    fuses q/k/v and gate/up (fuse_quantized), as it fuses float weights; until then the state_dict's
    tensors share no memory (safetensors refuses tensors that do)."""
    if mode not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {mode!r}")
    if mode == "none":
        return model
    for layer in model.layers:  # fuse_projections' bf16 copies would bypass the quantised weights
        layer.self_attn.qkv_proj = layer.mlp.gate_up_proj = None
    tuner = quant_kernels.Tuner()
    for root in (model.layers, model.image_head.net):
        quantize_linears(root, mode, tuner=tuner)
    model.image_in_projector = quantize_linear(model.image_in_projector, mode, tuner=tuner)
    model.image_out_projector = quantize_linear(model.image_out_projector, mode, tuner=tuner)
    return model
