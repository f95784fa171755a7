"""Files shipped inside the package: the built-in default model."""

from __future__ import annotations

from pathlib import Path

BUILTIN_MODEL = Path(__file__).parent / "assets" / "nextstep-shapes"


def builtin_model_dir() -> Path | None:
    """The built-in checkpoint directory, or None when this install has none."""
    return BUILTIN_MODEL if (BUILTIN_MODEL / "config.json").is_file() else None
