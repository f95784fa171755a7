"""File boundaries: atomic writes (a temp file in the target's folder, then os.replace, so readers never see a
partial file), an up-front check that an output can be written, and untrusted images opened with a pixel limit.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096  # largest input image accepted, in pixels; checked from the header, before decoding


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


def encode_png(image: Image.Image, metadata: dict[str, str] | None = None) -> bytes:
    """A PIL image as PNG bytes; each metadata item becomes an iTXt chunk, which PIL reads back into image.info."""
    info = PngImagePlugin.PngInfo()
    for key, text in (metadata or {}).items():
        info.add_itxt(key, text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, target: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """A PIL image as a PNG file, with optional text metadata (see encode_png)."""
    write_bytes(target, encode_png(image, metadata))


def check_writable(target: str | Path) -> None:
    """ValueError unless `target` can be written as a file: not a directory, and its folder (or the nearest
    existing one above it, which atomic_write would create the rest under) takes a new file."""
    target = Path(target)
    if target.is_dir():
        raise ValueError(f"output {str(target)!r} is a directory")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"output {str(target)!r}: {str(folder)!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".probe")
    except OSError as e:
        raise ValueError(f"output {str(target)!r} cannot be written: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def open_image(
    source: str | Path | bytes | BinaryIO, *, max_pixels: int = MAX_PIXELS, what: str = "image"
) -> Image.Image:
    """A decoded PIL image from a path, bytes or a binary file object; its size is read from the header and
    refused above `max_pixels` before any pixel is decoded. Every failure is one ValueError naming the source
    (a file object by its `name`, if it has one)."""
    name = repr(str(source)) if isinstance(source, str | Path) else getattr(source, "name", "(upload)")
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's hard limit, far above any sane max_pixels
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = found[1] if found else "too many"
        raise ValueError(f"{what} {name} has {pixels} pixels, more than the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {what} {name}: not an image format we read (PNG, JPEG, WEBP, ...)") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {name}: {e.strerror or e}") from None
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(f"{what} {name} is {w}x{h} ({w * h} pixels), more than the limit of {max_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data; PIL raises all three
        raise ValueError(f"cannot decode {what} {name}: {e}") from None
    return image
