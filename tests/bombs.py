"""Decompression bombs for the pixel-limit tests: valid PNGs that are tiny on disk and huge once decoded."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def bomb_png_bytes(side: int) -> bytes:
    """A valid 1-bit side x side PNG of zeros: a few KB, side**2 pixels once decoded."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def bomb_png(path: Path, side: int) -> Path:
    path.write_bytes(bomb_png_bytes(side))
    return path
