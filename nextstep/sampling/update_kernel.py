"""flow.guided_update as one Triton kernel: the guidance combination and the state update of one flow-head
step, x' = (eps +) a x + b guide(v), one program per image instead of a handful of elementwise ops. The engine
runs it with the fused head (head_kernels); tests also run it in Triton's CPU interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from nextstep.sampling.pdl import wait_previous
except ImportError:  # the CPU install has no Triton; the engine then uses flow.guided_update
    triton = None


if triton is not None:

    @triton.jit
    def _guided_update(
        x_ptr,  # (B, D) fp32 state
        eps_ptr,  # (B, D) fp32 scaled noise of this step (unused without HAS_EPS)
        v_ptr,  # (ROWS * B, D) branch velocities [cond; ...]
        scales_ptr,  # (2,) fp32 this token's (cfg, cfg_img)
        out_ptr,  # (B, D) fp32
        a,
        b,
        B,
        D,
        ROWS: tl.constexpr,
        HAS_EPS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        D_POW2: tl.constexpr,
        PDL: tl.constexpr,  # programmatic dependent launch (pdl.py); nothing to load before the wait
    ):
        """x' = (eps +) a x + b guide(v), one program per image (flow.combine_guidance's arithmetic)."""
        wait_previous(PDL)
        img = tl.program_id(0)
        d = tl.arange(0, D_POW2)
        m = d < D
        cond = tl.load(v_ptr + img * D + d, mask=m, other=0.0).to(tl.float32)
        g = cond
        if ROWS == 2:
            u = tl.load(v_ptr + (B + img) * D + d, mask=m, other=0.0).to(tl.float32)
            g = u + tl.load(scales_ptr) * (cond - u)
        if ROWS == 3:
            u1 = tl.load(v_ptr + (B + img) * D + d, mask=m, other=0.0).to(tl.float32)
            u2 = tl.load(v_ptr + (2 * B + img) * D + d, mask=m, other=0.0).to(tl.float32)
            g = u2 + tl.load(scales_ptr + 1) * (u1 - u2) + tl.load(scales_ptr) * (cond - u1)
        if NORMALIZE:
            ratio = tl.sqrt(tl.sum(cond * cond, axis=0)) / (tl.sqrt(tl.sum(g * g, axis=0)) + 1e-6)
            g = g * tl.minimum(tl.maximum(ratio, 0.0), 1.0)
        x = tl.load(x_ptr + img * D + d, mask=m, other=0.0)
        x = x * a
        if HAS_EPS:
            x = tl.load(eps_ptr + img * D + d, mask=m, other=0.0) + x
        tl.store(out_ptr + img * D + d, x + b * g, mask=m)


def guided_update(
    x: torch.Tensor,
    v: torch.Tensor,
    scales: torch.Tensor,
    eps: torch.Tensor | None,
    a: float,
    b: float,
    *,
    rows: int,
    normalize: bool,
    pdl: bool = False,
) -> torch.Tensor:
    """flow.guided_update as one kernel: x (B, D) fp32 -> (eps +) a x + b guide(v), v (rows * B, D),
    scales (2,) this token's (cfg, cfg_img) on the device; pdl: launched with programmatic dependent launch
    (pdl.py; SM90+)."""
    bsz, d = x.shape
    out = torch.empty_like(x)
    _guided_update[(bsz,)](
        x,
        x if eps is None else eps,
        v,
        scales,
        out,
        a,
        b,
        bsz,
        d,
        ROWS=rows,
        HAS_EPS=eps is not None,
        NORMALIZE=normalize,
        D_POW2=triton.next_power_of_2(d),
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out
