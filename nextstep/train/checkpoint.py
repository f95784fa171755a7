"""Training checkpoints: `output_dir/checkpoints/step-XXXXXXXX/` written with torch.distributed.checkpoint.

Each holds the model and optimizer (DCP, sharded, any world size can read the model back), per-rank
trainer state (data position, RNG states, scheduler) and the resolved config.json. A save goes to
`step-XXXXXXXX.tmp` and is renamed when every rank has finished, so a crash never leaves a half
checkpoint under a final name; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d{8})$")
CONFIG_NAME = "config.json"  # the resolved TrainConfig
META_NAME = "meta.json"  # step and world size of the save


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first (`.tmp` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config_json: str,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` collectively (every rank calls this)."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(trainer_state, tmp / f"trainer_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / CONFIG_NAME).write_text(config_json)
        (tmp / META_NAME).write_text(json.dumps({"step": step, "world_size": world}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, elastic: bool = False
) -> tuple[int, dict[str, Any], bool]:
    """Restore model and optimizer in place (DCP reshards them for any world size); returns (step, trainer
    state, same world size). With another world size the trainer state is rank 0's (its schedule); that is
    refused unless `elastic`, since the data position and RNG states are per rank."""
    path = Path(path)
    meta = json.loads((path / META_NAME).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    same = meta["world_size"] == world
    if not same and not elastic:
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} processes, resuming with {world}: the data "
            "position is per rank, so an exact resume needs the same world size (training.elastic_resume=true "
            "resumes anyway, restarting the data at the next epoch)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    check_model_shapes(path, model_sd)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(path / f"trainer_rank{_rank() if same else 0}.pt", weights_only=True)
    return meta["step"], trainer, same


def check_model_shapes(path: Path, model_sd: dict[str, torch.Tensor]) -> None:
    """ValueError unless checkpoint `path` holds every tensor of `model_sd` in the same shape (DCP itself fails
    with a multi-rank traceback): a resume after the architecture (or LoRA) changed."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    diffs = []
    for name, tensor in model_sd.items():
        entry = saved.get(f"model.{name}")
        if entry is None:
            diffs.append(f"{name} is not in it")
        elif tuple(entry.size) != tuple(tensor.shape):  # a DTensor's shape is the global one
            diffs.append(f"{name} is {tuple(entry.size)} there, {tuple(tensor.shape)} here")
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ValueError(
            f"checkpoint {path} was written by a model of other shapes: {diffs[0]}{more}; resume with the model "
            "settings it was trained with, or train into a new training.output_dir"
        )


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Only the model part of a training checkpoint, into an unsharded model (export, evaluation)."""
    sd = get_model_state_dict(model, options=StateDictOptions())
    state = {"model": sd}
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"], strict=True)
