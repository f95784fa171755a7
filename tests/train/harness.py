"""Helpers shared by the training-loop tests (SFT and RL): a free port for multi-process runs and a simulated
kill at a given step."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from nextstep.train.metrics import MetricsWriter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def killed_at(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Inside the block, training dies (KeyboardInterrupt, like a kill: no signal handling, no final save) when
    step `step` is logged; the block expects that and restores logging after it."""
    real_log = MetricsWriter.log

    def crash(self, at, values):
        if at == step:
            raise KeyboardInterrupt("simulated kill")
        real_log(self, at, values)

    monkeypatch.setattr(MetricsWriter, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(MetricsWriter, "log", real_log)
