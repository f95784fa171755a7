"""Atomic file writes: a temp file in the target's folder, then os.replace, so readers never see a partial file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename tmp_path onto target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def write_bytes(target: str | Path, data: bytes) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))


def write_json(target: str | Path, obj, *, indent: int = 2) -> None:
    write_text(target, json.dumps(obj, indent=indent) + "\n")


def torch_save(obj, target: str | Path) -> None:
    """torch.save that replaces `target` atomically."""
    import torch

    atomic_write(target, lambda tmp: torch.save(obj, tmp))


def save_png(image, target: str | Path) -> None:
    """A PIL image as PNG."""
    atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))
