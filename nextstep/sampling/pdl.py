"""Programmatic dependent launch (PDL) of the decode-time Triton kernels (head_kernels, update_kernel,
layer_kernels, quant_kernels): on SM90+ a kernel launched with the PDL attribute may start while the previous
kernel in the stream is still running. It loads what no earlier kernel writes (weights, scales, biases, norm
weights), then `wait_previous` blocks until the previous kernel has finished and its writes are visible, and
lets the next kernel launch in turn; every store and every read of activations comes after that wait. The
next kernel only starts once each program of this one has waited, so at most two kernels overlap, the later
one reading only weights. CUDA-graph capture keeps the programmatic edges (CUDA 12.3+ graph edge data).

    kernel[grid](..., PDL=pdl, launch_pdl=pdl)    # the kernel's constexpr; Triton's launch option (the
                                                  # CUDA launch attribute; the interpreter drops it)

`Engine(pdl=True)` turns it on; `supported(device)` says where it can.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no Triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one before grid dependency control: the kernels run without PDL only
    gdc_wait = gdc_launch_dependents = None


def supported(device: torch.device) -> bool:
    """PDL can run on `device`: Triton with grid dependency control, a CUDA device of compute capability 9.0+
    (the griddepcontrol instructions), and not Triton's CPU interpreter (it cannot run inline PTX)."""
    return (
        gdc_wait is not None
        and device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def check(device: torch.device) -> None:
    """ValueError naming the device (and its capability) unless supported(device)."""
    if supported(device):
        return
    what = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        what += f" ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        what += " under TRITON_INTERPRET=1"
    raise ValueError(f"pdl=True needs Triton and a CUDA device of compute capability 9.0 or newer, got {what}")


if triton is not None:

    @triton.jit
    def wait_previous(PDL: tl.constexpr):
        """With PDL: wait for the previous kernel (its writes visible after this), then let the next kernel launch
        (its weight loads overlap the rest of this one). Without: nothing."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
