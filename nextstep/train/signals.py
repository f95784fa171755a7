"""Stopping on a signal: SIGINT/SIGTERM let the step finish, save a checkpoint, then stop."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, save a checkpoint and stop; a second signal
    interrupts at once. Ranks agree on the stop step (an all-reduce every `every` steps), since saving
    is collective."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint after this step, then stopping (send again to abort)", signum)

    def agreed(self, step: int, *, every: int, device: torch.device) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        if step % every:
            return False
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
