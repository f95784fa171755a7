"""The training sample format: one definition of what a sample is and how it sits in a tar shard.

A sample is `key.json` (a JSON object whose `caption` holds `<image_0>`, `<image_1>`, ... placeholders
marking where images go) plus `key-0.png`, `key-1.png`, ... Keys contain no dots or hyphens.
Latent shards (`nextstep data encode-latents`) store each image as its VAE latents instead:
`key-0.npy`, a float16 (C, H/8, W/8) array in NumPy's .npy format (no pickles).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import torch
from PIL import Image

from nextstep.io import open_image

PLACEHOLDER_RE = re.compile(r"<image_(\d+)>")
# Dots and hyphens separate key from field in member names; slashes and whitespace would break paths.
_BAD_KEY_CHARS = re.compile(r"[.\-/\\\s]")
_KEY_RE = re.compile(r"^[^.\-]*")  # the key part of a member name
_MEMBER_RE = re.compile(r"^(?P<key>[^.\-]+)(?:\.json|-(?P<index>\d+)\.(?P<ext>[A-Za-z]+))$")
# Readers accept these image suffixes; writers always store PNG as the spec says.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
LATENT_EXT = "npy"  # precomputed VAE latents
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
# zlib level 1 keeps shards lossless at a fraction of the default level-6 encode time.
PNG_COMPRESS_LEVEL = 1


@dataclass
class Sample:
    """One training sample: caption text with image placeholders, the images, and extra JSON fields."""

    key: str  # unique id; no dots, hyphens, slashes or whitespace
    caption: str  # text with <image_i> placeholders in sequence order
    # images[i] fills <image_i>: PIL images, or latent tensors (C, h, w) in latent shards
    images: list[Image.Image | torch.Tensor] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # extra JSON fields, preserved verbatim


@dataclass
class RawSample:
    """A sample's undecoded bytes as read from a tar: the JSON document and image files in index order."""

    key: str
    json: bytes
    images: list[bytes]
    error: str | None = None  # why the sample's members cannot make a sample (bad name, duplicate, missing JSON)


def validate_key(key: str) -> None:
    """Raise ValueError unless `key` is a non-empty name without dots, hyphens, slashes or whitespace."""
    if not isinstance(key, str) or not key or _BAD_KEY_CHARS.search(key):
        raise ValueError(f"sample {key!r}: key must be non-empty and contain no '.', '-', '/', '\\' or spaces")


def placeholder_indices(caption: str) -> list[int]:
    """Image indices of the `<image_i>` placeholders in `caption`, in order of appearance."""
    return [int(m.group(1)) for m in PLACEHOLDER_RE.finditer(caption)]


def validate_caption(key: str, caption: str, num_images: int) -> None:
    """Raise ValueError naming `key` unless placeholders are exactly <image_0>..<image_{n-1}>, in order."""
    if not isinstance(caption, str):
        raise ValueError(f"sample {key!r}: caption must be a string, got {type(caption).__name__}")
    found = placeholder_indices(caption)
    if found != list(range(num_images)):
        raise ValueError(
            f"sample {key!r}: caption placeholders {[f'<image_{i}>' for i in found]} do not match "
            f"{num_images} image(s); expected <image_0>..<image_{num_images - 1}> each once, in order"
        )


def validate_sample(sample: Sample) -> None:
    """Raise ValueError naming the sample's key if it breaks the format (key, placeholders, meta)."""
    validate_key(sample.key)
    validate_caption(sample.key, sample.caption, len(sample.images))
    if "caption" in sample.meta:
        raise ValueError(f"sample {sample.key!r}: meta must not contain 'caption' (it is the caption field)")
    latent = [isinstance(im, torch.Tensor) for im in sample.images]
    for i, image in enumerate(sample.images):
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or not image.is_floating_point():
                raise ValueError(
                    f"sample {sample.key!r}: latent {i} must be a float (C, h, w) tensor, got "
                    f"{image.dtype} {tuple(image.shape)}"
                )
        elif not isinstance(image, Image.Image):
            raise ValueError(f"sample {sample.key!r}: image {i} is {type(image).__name__}, not a PIL image")
    if any(latent) and not all(latent):
        raise ValueError(f"sample {sample.key!r}: mixes latents and images")


def caption_segments(caption: str) -> list[str | int]:
    """Text pieces and image indices in sequence order: "a <image_0> b" -> ["a ", 0, " b"]."""
    segments: list[str | int] = []
    pos = 0
    for m in PLACEHOLDER_RE.finditer(caption):
        if m.start() > pos:
            segments.append(caption[pos : m.start()])
        segments.append(int(m.group(1)))
        pos = m.end()
    if pos < len(caption):
        segments.append(caption[pos:])
    return segments


def parse_member_name(name: str) -> tuple[str, int | None]:
    """Split a tar member name into (key, image index), index None for the JSON: "k-1.png" -> ("k", 1)."""
    base = PurePosixPath(name).name
    m = _MEMBER_RE.match(base)
    exts = (*IMAGE_EXTS, LATENT_EXT)
    if m is None or (m.group("ext") is not None and m.group("ext").lower() not in exts):
        raise ValueError(f"tar member {name!r} is not 'key.json' or 'key-<i>.<{'|'.join(exts)}>'")
    index = m.group("index")
    return m.group("key"), None if index is None else int(index)


def encode_image(image: Image.Image) -> bytes:
    """PNG bytes of `image`; modes PNG cannot store are converted to RGB."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def is_latent(data: bytes) -> bool:
    """Whether an image member holds .npy latents (by content, as members are matched by index)."""
    return data[: len(_NPY_MAGIC)] == _NPY_MAGIC


def encode_latent(latent: torch.Tensor) -> bytes:
    """.npy bytes of a (C, h, w) latent, stored as float16."""
    buf = io.BytesIO()
    np.save(buf, latent.detach().to("cpu", torch.float16).numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_latent(data: bytes, key: str, index: int) -> torch.Tensor:
    """A float16 (C, h, w) tensor from .npy bytes; raises ValueError naming the sample on anything else."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError... on malformed headers
        raise ValueError(f"sample {key!r}: latent {index} cannot be read: {e}") from e
    if array.ndim != 3 or array.dtype not in (np.float16, np.float32) or not np.isfinite(array).all():
        raise ValueError(
            f"sample {key!r}: latent {index} must be a finite float16/float32 (C, h, w) array, "
            f"got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float16))


def encode_sample(sample: Sample, *, png_files: list[bytes | None] | None = None) -> list[tuple[str, bytes]]:
    """Validated tar members (name, bytes) of `sample`: `key.json` then `key-0.png`, `key-1.png`, ...
    (`key-0.npy`, ... for latents).

    `png_files[i]`, when not None, is image i's source PNG file stored as-is (lossless, no re-encode).
    """
    validate_sample(sample)
    doc = {"caption": sample.caption, **sample.meta}
    try:
        payload = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"sample {sample.key!r}: meta is not JSON-serializable: {e}") from e
    members = [(f"{sample.key}.json", payload)]
    png_files = png_files or [None] * len(sample.images)
    for i, (image, data) in enumerate(zip(sample.images, png_files, strict=True)):
        if isinstance(image, torch.Tensor):
            members.append((f"{sample.key}-{i}.{LATENT_EXT}", encode_latent(image)))
        else:
            members.append((f"{sample.key}-{i}.png", encode_image(image) if data is None else data))
    return members


def decode_sample(raw: RawSample) -> Sample:
    """Parse, validate and decode a RawSample; raises ValueError naming the key. Images are checked against
    io.MAX_PIXELS from their header before any pixel is decoded."""
    if raw.error is not None:
        raise ValueError(raw.error)
    try:
        doc = json.loads(raw.json)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"sample {raw.key!r}: invalid JSON: {e}") from e
    if not isinstance(doc, dict) or "caption" not in doc:
        raise ValueError(f"sample {raw.key!r}: JSON must be an object with a 'caption' field")
    caption = doc.pop("caption")
    validate_caption(raw.key, caption, len(raw.images))
    images: list[Image.Image | torch.Tensor] = []
    for i, data in enumerate(raw.images):
        if is_latent(data):
            images.append(decode_latent(data, raw.key, i))
        else:
            fp = io.BytesIO(data)
            fp.name = f"{i} of sample {raw.key!r}"  # messages read "image 0 of sample 'k' ..."
            images.append(open_image(fp))
    if len({isinstance(im, torch.Tensor) for im in images}) > 1:
        raise ValueError(f"sample {raw.key!r}: mixes latents and images")
    return Sample(key=raw.key, caption=caption, images=images, meta=doc)


class _StrictTarInfo(tarfile.TarInfo):
    """Tar headers where the end of the data or a damaged header is an error: tarfile itself ends the archive
    silently there once past the first member, so a cut shard would read as a shorter intact one."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            # Only a zero block (tarfile.EOFHeaderError, passed on) ends an intact archive.
            what = "the data ends" if isinstance(e, tarfile.EmptyHeaderError) else f"damaged header ({e})"
            raise tarfile.ReadError(f"truncated or corrupt tar: {what} before the end-of-archive marker") from None


@dataclass
class _Pending:
    """The members of one sample while a tar is read."""

    key: str
    json: bytes | None = None
    images: dict[int, bytes] = field(default_factory=dict)
    error: str | None = None

    def fail(self, message: str) -> None:
        self.error = self.error or f"sample {self.key!r}: {message}"

    def add(self, index: int | None, data: bytes) -> None:
        if index is None:
            if self.json is not None:
                self.fail(f"duplicate {self.key}.json")
            self.json = data
        else:
            if index in self.images:
                self.fail(f"duplicate image {index}")
            self.images[index] = data

    def finish(self) -> RawSample:
        if self.json is None:
            self.fail(f"missing {self.key}.json")
        if sorted(self.images) != list(range(len(self.images))):
            self.fail(f"image indices {sorted(self.images)} are not 0..{len(self.images) - 1}")
        images = [self.images[i] for i in sorted(self.images)]
        return RawSample(key=self.key, json=self.json or b"", images=images, error=self.error)


def iter_raw_samples(fileobj: IO[bytes], *, offsets: list[int] | None = None) -> Iterator[RawSample]:
    """Stream RawSamples from an open tar byte stream; raises tarfile.ReadError when the tar is truncated or
    corrupt. A sample whose members are wrong comes with `error` set (decode_sample raises it) and the
    samples after it are read as usual.

    If `offsets` is given, the byte offset of each sample's first tar header is appended to it.
    """
    pending: _Pending | None = None
    seen: set[str] = set()
    with tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_StrictTarInfo) as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"tar member {member.name!r} is truncated")
            try:
                key, index, problem = *parse_member_name(member.name), None
            except ValueError as e:  # attributed to the key its name starts with, which it spoils
                key, index, problem = _KEY_RE.match(PurePosixPath(member.name).name)[0] or member.name, None, str(e)
            if pending is None or key != pending.key:
                if pending is not None:
                    yield pending.finish()
                pending = _Pending(key)
                if key in seen:
                    pending.fail("members are not contiguous or key is duplicated")
                seen.add(key)
                if offsets is not None:
                    offsets.append(member.offset)
            if problem is None:
                pending.add(index, data)
            else:
                pending.fail(problem)
    if pending is not None:
        yield pending.finish()


def read_shard(path: str | os.PathLike) -> Iterator[Sample]:
    """Yield the decoded Samples of a local tar shard in stored order; raises on any corrupt input."""
    with open(path, "rb") as f:
        for raw in iter_raw_samples(f):
            yield decode_sample(raw)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same samples always give byte-identical shards (stable sha256).
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def shard_path(out_dir: str | Path, prefix: str, index: int) -> Path:
    """Where ShardWriter publishes shard number `index`: OUT/{prefix}-{index:06d}.tar."""
    return Path(out_dir) / f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Write samples into `out_dir/{prefix}-{index:06d}.tar`, at most `max_count` per shard.

    Each shard is written under a temporary name and `os.replace`d into place when full or on close,
    so readers never see a partial shard. On an exception inside the `with` block the open shard is
    discarded; shards already finished stay. `paths` lists the finished shards in order.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "data",
        max_count: int = 1000,
        start_index: int = 0,
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"prefix must be a non-empty file name stem without '/' or '.', got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.index = start_index
        self.paths: list[Path] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def shard_path(self, index: int) -> Path:
        """Final path of shard number `index`."""
        return shard_path(self.out_dir, self.prefix, index)

    def write(self, sample: Sample) -> None:
        """Validate and append one sample, opening a new shard when the current one is full."""
        self.write_members(sample.key, encode_sample(sample))

    def write_members(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append the pre-encoded members of one sample (from `encode_sample`)."""
        if key in self._keys:
            raise ValueError(f"sample {key!r}: duplicate key")
        self._keys.add(key)
        if self._tar is None:
            final = self.shard_path(self.index)
            self._tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for name, data in members:
            _add_member(self._tar, name, data)
        self._count += 1
        if self._count >= self.max_count:
            self._finish_shard()

    def close(self) -> None:
        """Publish the open shard, if any."""
        if self._tar is not None:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.shard_path(self.index)
        os.replace(self._tmp, final)
        self.paths.append(final)
        self._tar, self._tmp, self._count = None, None, 0
        self.index += 1

    def _discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar, self._tmp, self._count = None, None, 0


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "data",
    max_count: int = 1000,
    start_index: int = 0,
) -> list[Path]:
    """Write all `samples` as shards into `out_dir`; returns the shard paths in order."""
    with ShardWriter(out_dir, prefix=prefix, max_count=max_count, start_index=start_index) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.paths
