"""Where the official-format reference checkpoints live, and which layout each one has.

Both references ship inside the repository (tests/reference, byte-identical copies of the official-format
files; NEXTSTEP_REFERENCE_ROOT may point elsewhere); NEXTSTEP_REFERENCE may name more directories of either
layout, separated by os.pathsep. Every test finds them through ROOT. The layout is read from the files a
directory holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(os.environ.get("NEXTSTEP_REFERENCE_ROOT", Path(__file__).resolve().parent / "reference"))


def reference_dirs() -> list[Path]:
    dirs = [p for p in (ROOT / "nextstep-tiny", ROOT / "nextstep11-tiny") if p.is_dir()]
    extra = os.environ.get("NEXTSTEP_REFERENCE", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def layout(path: Path) -> str:
    """'nextstep1' when it holds meta.json + a_..e_ files, 'nextstep11' when it holds reference.json."""
    if (path / "reference" / "meta.json").is_file():
        return "nextstep1"
    if (path / "reference" / "reference.json").is_file():
        return "nextstep11"
    raise ValueError(f"{path} holds no known reference layout")


def dirs_with(kind: str) -> list[Path]:
    return [p for p in reference_dirs() if layout(p) == kind]


def first_with(kind: str) -> Path:
    """The first reference directory of `kind`; skips the test when there is none."""
    import pytest

    found = dirs_with(kind)
    if not found:
        pytest.skip(f"no {kind} reference checkpoint under {ROOT} or in NEXTSTEP_REFERENCE")
    return found[0]


def tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(path / "reference" / name))


def meta(path: Path) -> dict:
    name = "meta.json" if layout(path) == "nextstep1" else "reference.json"
    return json.loads((path / "reference" / name).read_text())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
