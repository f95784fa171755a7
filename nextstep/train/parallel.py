"""Parallelism applied to a plain NextStep model from outside: activation checkpointing, per-layer
torch.compile and FSDP2 sharding, composed in `parallelize` (the torchtitan order: AC, compile, FSDP);
`setup_distributed` joins the process group first.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from nextstep.model.nextstep import NextStep
from nextstep.train.config import ParallelConfig

log = logging.getLogger(__name__)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_ac(model: NextStep) -> None:
    """Recompute every decoder layer in backward; only layer inputs stay alive between passes.
    The wrapper's state-dict hooks drop its prefix, so parameter names are unchanged."""
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(model: NextStep) -> None:
    """Compile each decoder layer (and the head network) in place: one graph is reused by all layers,
    and FSDP's per-layer hooks stay outside the graphs. Sequence width and head rows change from batch to
    batch, so a size that changes is made dynamic at its first recompile (dynamic=None), instead of one
    graph per size until the recompile limit sends the rest of the run to eager (dynamic=False)."""
    for layer in model.layers:
        layer.compile(dynamic=None)
    model.image_head.net.compile(dynamic=None)


def apply_fsdp(
    model: NextStep,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2: one unit per decoder layer, one for the flow head network, and the root (embeddings,
    norms, lm_head, projectors). The last layer stays gathered after forward since backward needs it
    at once."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model.image_head.net, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root (embeddings, lm_head, projectors) is what backward needs first: keep it gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    # Training enters through forward_train, not __call__: give it the root's gather/reshard hooks.
    register_fsdp_forward_method(model, "forward_train")


def uses_fsdp(cfg: ParallelConfig) -> bool:
    return cfg.fsdp and dist.is_initialized()


def init_single_process_group(device: torch.device) -> None:
    """A one-rank process group, so one plain process gets the same FSDP2 mixed precision as torchrun
    (bf16 compute copies of fp32 masters) instead of autocast."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def setup_distributed(cfg: ParallelConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): joins the torchrun process group when launched by torchrun, or a
    one-rank group when one process asks for FSDP2 mixed precision."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not cfg.fsdp:
        raise ValueError("parallel.fsdp=false with more than one process: only FSDP2 is supported")
    if cfg.param_dtype != "float32" and cfg.fsdp:
        init_single_process_group(device)  # mixed precision comes from FSDP2, also in one process
    elif cfg.param_dtype != "float32":
        raise ValueError(f"parallel.param_dtype={cfg.param_dtype} needs parallel.fsdp=true")
    return rank, world, device


def parallelize(model: NextStep, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Apply what `cfg` asks for, in order: activation checkpointing, compile, FSDP2."""
    if cfg.activation_checkpointing:
        apply_ac(model)
    compile_ = cfg.compile
    if compile_ and device.type == "cpu" and cfg.param_dtype != "float32":
        # Inductor's C++ backend fails to build the bf16/fp16 layer (a torch bug): run eager instead.
        log.warning("parallel.compile=true ignored on CPU with param_dtype=%s (runs eager)", cfg.param_dtype)
        compile_ = False
    if compile_:
        apply_compile(model)
    if uses_fsdp(cfg):
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        apply_fsdp(
            model,
            mesh,
            param_dtype=DTYPE[cfg.param_dtype],
            reduce_dtype=DTYPE[cfg.reduce_dtype],
            reshard_after_forward=cfg.reshard_after_forward,
        )
    log.info(
        "parallelize: fsdp=%s ac=%s compile=%s param_dtype=%s",
        uses_fsdp(cfg),
        cfg.activation_checkpointing,
        compile_,
        cfg.param_dtype,
    )
    return model
