"""Tuned kernel launch configurations kept on disk, one JSON file per GPU model, so that a second process
skips the timing (issue 22, cold start): the fp8/int8 GEMM's `quant_kernels.Tuner` and the fused head's
`head_kernels.tune` read and write it.

    $NEXTSTEP_CACHE_DIR/tuning/<gpu>.json, else ~/.cache/nextstep/tuning/<gpu>.json
    {"triton": "3.6.0", "quant_linear": {"float8_e4m3fn/16/7168/5120": {"block_n": 32, ...}}, "head": {...}}

Entries are valid for the Triton version that timed them; a file of another version, or one that cannot be
read, is ignored with a warning (and replaced on the next write). Writes are atomic (nextstep.io).

A fresh machine has no such file. For the GPUs we measure on, the package ships the file a tuning run there
wrote (nextstep/assets/tuning/<gpu>.json, the same format, copied from a GPU run's cache folder): an entry
missing from the user's file is read from it, so a first process on such a GPU skips the timing too, as long
as its Triton is the one that tuned it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import TypeVar

from nextstep.io import write_json

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_dir() -> Path:
    """Where tuning files live: $NEXTSTEP_CACHE_DIR/tuning, else ~/.cache/nextstep/tuning."""
    root = os.environ.get("NEXTSTEP_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "nextstep") / "tuning"


SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tuning"  # tables shipped with the package


def cache_path(gpu: str, root: Path | None = None) -> Path:
    """The file of one GPU model, its name made file-safe ("NVIDIA H200" -> NVIDIA_H200.json), in `root`
    (default: the user's cache_dir())."""
    return (root or cache_dir()) / (re.sub(r"[^A-Za-z0-9.-]+", "_", gpu).strip("_") + ".json")


def entry_key(*parts) -> str:
    """One entry's key within a kernel's table: the parts joined by "/" (dtype names, row bucket, N, K...)."""
    return "/".join(str(p) for p in parts)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


class TuningCache:
    """One GPU model's stored configurations, read from disk once; `put` merges into the file as it is then
    (another process may have added entries) and rewrites it atomically."""

    def __init__(self, gpu: str):
        self.path = cache_path(gpu)
        self.version = _triton_version()
        self.data = self._read()
        self.shipped = self._read(cache_path(gpu, SHIPPED), level=logging.INFO)  # read-only fallback

    def _read(self, path: Path | None = None, level: int = logging.WARNING) -> dict:
        """A file's tables (default: the user's), or {} (logged at `level`) when it is missing, corrupt or of
        another Triton."""
        path = path or self.path
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, dict) for k, v in data.items() if k != "triton"):
                raise ValueError("not a table of kernels")
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            log.log(level, "ignoring the unreadable tuning cache %s (%s); tuning again", path, e)
            return {}
        if data.get("triton") != self.version:
            log.log(
                level,
                "ignoring tuning cache %s: tuned with Triton %s, running %s",
                path,
                data.get("triton"),
                self.version,
            )
            return {}
        return {k: v for k, v in data.items() if k != "triton"}

    def get(self, kernel: str, key: str, kind: type[T]) -> T | None:
        """The stored launch configuration of `kernel` for `key`, as the dataclass `kind`; None if there is
        none or its fields are not `kind`'s (written by another version of the kernel: tuned again)."""
        entry = self.data.get(kernel, {}).get(key) or self.shipped.get(kernel, {}).get(key)
        if entry is None:
            return None
        try:
            return kind(**entry)
        except TypeError:
            log.warning("ignoring the tuning cache's %s entry %s: %s is not a %s", kernel, key, entry, kind.__name__)
            return None

    def put(self, kernel: str, key: str, config) -> None:
        """Store one configuration (a dataclass); a cache that cannot be written only costs the next process
        a tuning."""
        self.data = self._read()
        self.data.setdefault(kernel, {})[key] = dataclasses.asdict(config)
        try:
            write_json(self.path, {"triton": self.version, **self.data})
        except OSError as e:
            log.warning("could not write the tuning cache %s (%s)", self.path, e)
