"""Dataset tools: build shards from raw data, per-shard metadata (meta.json), and the training index cache.

nextstep data build-wds photos/ shards/ --shard-size 1000 --workers 8    # or: build_wds ...
nextstep data meta shards/                                               # or: gen_meta shards/
nextstep data warmup shards/ --n_jobs 32                                 # or: warmup_data ...
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import IO

import torch
from PIL import Image
from tqdm import tqdm

from nextstep.args import ArgumentParser
from nextstep.data.format import (
    PLACEHOLDER_RE,
    Sample,
    ShardWriter,
    decode_sample,
    encode_sample,
    iter_raw_samples,
)
from nextstep.data.index import INDEX_NAME, META_NAME, read_json
from nextstep.io import open_image, write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    """One raw-data sample before loading: caption with placeholders and image file paths."""

    key: str
    caption: str | None  # None: a folder image without its .txt caption file (a bad sample)
    images: list[Path] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    where: str = ""  # source location for error messages ("manifest.jsonl:12")


def _pmap(fn: Callable, items: Iterable, workers: int, *, chunksize: int = 1) -> Iterator:
    """Ordered map over `workers` processes (in-process when 1), so output never depends on workers."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


def _as_key(text: str) -> str:
    # Derived keys (file names, row numbers) are made legal; explicit manifest keys are validated as given.
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def _t2i_caption(text: str) -> str:
    """Plain text-to-image caption -> "text <image_0>"; captions that already place the image stay."""
    return text if PLACEHOLDER_RE.search(text) else f"{text.strip()} <image_0>"


def iter_records(source: str | os.PathLike) -> Iterator[Record]:
    """Records of a folder (image + same-name .txt caption), a JSONL manifest or a CSV (caption,image)."""
    source = Path(source)
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = path.with_suffix(".txt")
            rel = path.relative_to(source).with_suffix("").as_posix()
            caption = _t2i_caption(txt.read_text(encoding="utf-8")) if txt.exists() else None
            yield Record(_as_key(rel), caption, [path], where=str(path))
    elif source.suffix == ".jsonl":
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{source}:{n}"
                try:
                    doc = json.loads(line)
                    images = [source.parent / p for p in doc.pop("images", [])]
                    key = str(doc.pop("key", f"s{n:09d}"))
                    yield Record(key, doc.pop("caption"), images, doc, where)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise ValueError(f"{where}: bad manifest line: {type(e).__name__}: {e}") from e
    elif source.suffix == ".csv":
        with open(source, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                where = f"{source}:{n}"
                if "caption" not in row or "image" not in row:
                    raise ValueError(f"{where}: CSV needs columns 'caption' and 'image', got {list(row)}")
                caption, image = row.pop("caption"), row.pop("image")
                images = [source.parent / image] if image else []
                key = _as_key(row.pop("key", "") or f"s{n:09d}")
                yield Record(key, _t2i_caption(caption) if images else caption, images, row, where)
    else:
        raise ValueError(f"{source}: expected a folder, a .jsonl manifest or a .csv file")


def load_record(record: Record, *, max_size: int | None = None) -> Sample:
    """Decode a record's images (fully, to catch corrupt files; at most io.MAX_PIXELS each, checked from the
    header) and downscale to `max_size` if given."""
    if record.caption is None:
        txt = Path(record.where).with_suffix(".txt")
        raise ValueError(
            f"sample {record.key!r}: image {record.where} has no caption file {txt.name} "
            "(an empty .txt file gives an empty caption)"
        )
    images = []
    for path in record.images:
        try:
            image = open_image(path)
        except ValueError as e:
            raise ValueError(f"sample {record.key!r} ({record.where}): {e}") from None
        images.append(image if max_size is None else _shrink(image, max_size))
    return Sample(record.key, record.caption, images, record.meta)


def _shrink(image: Image.Image, max_size: int) -> Image.Image:
    scale = max_size / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _png_file(path: Path, size: tuple[int, int]) -> bytes | None:
    """The file's bytes if it is a PNG of `size` (not resized), else None."""
    with Image.open(path) as im:
        return path.read_bytes() if im.format == "PNG" and im.size == size else None


def _encode_record(args: tuple[Record, int | None]) -> tuple[str, list[tuple[str, bytes]] | str]:
    record, max_size = args
    try:
        sample = load_record(record, max_size=max_size)
        # Decoded PNGs that keep their size are copied as they are: re-encoding costs ~5x the decode.
        png_files = [_png_file(path, im.size) for path, im in zip(record.images, sample.images, strict=True)]
        return record.key, encode_sample(sample, png_files=png_files)
    except ValueError as e:
        msg = str(e)
        return record.key, msg if record.where in msg else f"{msg} ({record.where})"


@dataclass
class BuildReport:
    paths: list[Path]  # shards written, in order
    written: int  # samples written
    skipped: list[str]  # one-line errors of samples left out (only with skip_bad)


def build_wds(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "data",
    shard_size: int = 1000,
    max_size: int | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> BuildReport:
    """Convert raw data into shards; the first bad sample raises ValueError unless `skip_bad`."""
    records = ((r, max_size) for r in iter_records(source))
    skipped: list[str] = []
    written = 0
    with ShardWriter(out_dir, prefix=prefix, max_count=shard_size) as writer:
        results = _pmap(_encode_record, records, workers, chunksize=16)
        for key, result in tqdm(results, disable=not progress, unit="sample"):
            if isinstance(result, str):
                if not skip_bad:
                    raise ValueError(result)
                log.warning("skipped: %s", result)
                skipped.append(result)
                continue
            writer.write_members(key, result)
            written += 1
    return BuildReport(writer.paths, written, skipped)


class _HashingReader(io.RawIOBase):
    """Read-through stream that hashes and counts every byte read."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.sha.update(memoryview(b)[:n])
        self.nbytes += n
        return n


def scan_shard(path: str | os.PathLike) -> dict:
    """Count, checksum, image-size stats and sample offsets of one shard, every sample decoded; a sample that
    cannot be used is listed in `bad_samples` (key -> error) and the scan goes on; a truncated or corrupt tar
    stops it with `error` set. Nothing is raised."""
    path = Path(path)
    st = path.stat()
    entry: dict = {"size": st.st_size, "mtime": st.st_mtime_ns, "count": 0, "images": 0, "error": None}
    widths, heights, keys, offsets, bad = [], [], [], [], {}
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        stream = io.BufferedReader(reader, 1 << 20)
        try:
            for raw in iter_raw_samples(stream, offsets=offsets):
                keys.append(raw.key)  # bad samples too: the index's offsets count every sample of the tar
                try:
                    sample = decode_sample(raw)
                except ValueError as e:
                    bad[raw.key] = str(e)
                    continue
                for image in sample.images:  # latent shards: sizes in latent cells
                    h, w = image.shape[1:] if isinstance(image, torch.Tensor) else (image.height, image.width)
                    widths.append(w)
                    heights.append(h)
        except Exception as e:  # truncated / corrupt tar: keep what was readable, report the rest
            entry["error"] = f"{type(e).__name__}: {e}"
        while stream.read(1 << 20):  # hash the whole file even when parsing stopped early
            pass
    del offsets[len(keys) :]
    entry.update(sha256=reader.sha.hexdigest(), count=len(keys), images=len(widths), bad_samples=bad)
    if widths:
        entry["width"] = {"min": min(widths), "max": max(widths), "mean": sum(widths) / len(widths)}
        entry["height"] = {"min": min(heights), "max": max(heights), "mean": sum(heights) / len(heights)}
    entry["keys"], entry["offsets"] = keys, offsets
    return entry


def _shards(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tar"))


def _scan_all(root: Path, names: list[str], workers: int, progress: bool) -> dict[str, dict]:
    results = _pmap(scan_shard, [root / n for n in names], workers)
    return dict(zip(names, tqdm(results, total=len(names), disable=not progress, unit="shard"), strict=True))


def gen_meta(root: str | os.PathLike, *, workers: int = 1, progress: bool = False) -> dict:
    """Write ROOT/meta.json (per-shard count, bytes, sha256, image sizes, error of a truncated or corrupt tar,
    bad samples by key); reuses unchanged shards. `count` includes bad samples (they occupy the tar)."""
    root = Path(root)
    old = read_json(root / META_NAME).get("shards", {})
    shards, todo = {}, []
    for path in _shards(root):
        name, st = path.relative_to(root).as_posix(), path.stat()
        prev = old.get(name)
        if prev and (prev["size"], prev["mtime"]) == (st.st_size, st.st_mtime_ns):
            shards[name] = prev
        else:
            todo.append(name)
    for name, entry in _scan_all(root, todo, workers, progress).items():
        del entry["keys"], entry["offsets"]  # those belong to the index (warmup_data)
        shards[name] = entry
    shards = dict(sorted(shards.items()))
    doc = {
        "version": 1,
        "num_shards": len(shards),
        "num_samples": sum(e["count"] for e in shards.values()),
        "num_bytes": sum(e["size"] for e in shards.values()),
        "errors": {n: e["error"] for n, e in shards.items() if e["error"]},
        "bad_samples": {n: e["bad_samples"] for n, e in shards.items() if e.get("bad_samples")},
        "rescanned": len(todo),
        "shards": shards,
    }
    write_json(root / META_NAME, doc, indent=1)
    return doc


def warmup_index(root: str | os.PathLike, *, n_jobs: int = 1, progress: bool = False) -> dict:
    """Write ROOT/index.json (per-shard keys, byte offsets, counts) for shards meta.json lists as intact; the
    others are logged and listed in its `left_out` (name -> why)."""
    root = Path(root)
    meta = read_json(root / META_NAME).get("shards")
    if meta is None:
        raise FileNotFoundError(f"{root / META_NAME} missing or unreadable: run gen_meta {root} first")
    old = read_json(root / INDEX_NAME).get("shards", {})
    shards, todo, left_out = {}, [], {}
    for name, m in meta.items():
        prev = old.get(name)
        if m["error"]:
            left_out[name] = f"corrupt in {META_NAME}: {m['error']}"
            continue
        if prev and (prev["sha256"], prev["size"]) == (m["sha256"], m["size"]):
            shards[name] = prev
        else:
            todo.append(name)
    for name, entry in _scan_all(root, todo, n_jobs, progress).items():
        if (entry["sha256"], entry["size"]) != (meta[name]["sha256"], meta[name]["size"]):
            left_out[name] = "changed since gen_meta (rerun gen_meta)"
            continue
        shards[name] = {k: entry[k] for k in ("size", "sha256", "count", "keys", "offsets")}
    for name, why in left_out.items():
        log.warning("%s left out of the index: %s", name, why)
    doc = {"version": 1, "shards": dict(sorted(shards.items())), "left_out": left_out}
    write_json(root / INDEX_NAME, doc, indent=1)
    return doc


def main_build_wds(argv: list[str] | None = None) -> int:
    """build_wds SOURCE OUT_DIR: folder (image + .txt), manifest.jsonl or data.csv -> tar shards."""
    p = ArgumentParser(prog="build_wds", description=main_build_wds.__doc__)
    p.add_argument("source", help="folder of images with same-name .txt captions, a .jsonl manifest or a .csv")
    p.add_argument("out_dir")
    p.add_argument("--prefix", default="data", help="shard file name prefix: PREFIX-000000.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--max-size", type=int, default=None, help="downscale images so the longer side <= this")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad samples instead of stopping")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = build_wds(
            args.source,
            args.out_dir,
            prefix=args.prefix,
            shard_size=args.shard_size,
            max_size=args.max_size,
            workers=args.workers,
            skip_bad=args.skip_bad,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"build_wds: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.written} samples in {len(report.paths)} shards to {args.out_dir}; skipped {len(report.skipped)}"
    )
    return 0


def main_gen_meta(argv: list[str] | None = None) -> int:
    """gen_meta ROOT: per-shard counts, checksums and image sizes -> ROOT/meta.json."""
    p = ArgumentParser(prog="gen_meta", description=main_gen_meta.__doc__)
    p.add_argument("root")
    p.add_argument("--workers", "--n_jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    doc = gen_meta(args.root, workers=args.workers, progress=True)
    for name, error in doc["errors"].items():
        print(f"CORRUPT {name}: {error}")
    for name, bad in doc["bad_samples"].items():
        for key, error in bad.items():
            print(f"BAD SAMPLE {name} {key}: {error}")
    num_bad = sum(len(bad) for bad in doc["bad_samples"].values())
    print(
        f"{doc['num_shards']} shards ({doc['rescanned']} rescanned), {doc['num_samples']} samples, "
        f"{doc['num_bytes'] / 1e9:.3f} GB, {len(doc['errors'])} corrupt, {num_bad} bad samples "
        f"-> {Path(args.root) / META_NAME}"
    )
    return 1 if doc["errors"] or num_bad else 0


def main_warmup(argv: list[str] | None = None) -> int:
    """warmup_data ROOT --n_jobs N: cache per-shard keys/offsets/counts -> ROOT/index.json."""
    p = ArgumentParser(prog="warmup_data", description=main_warmup.__doc__)
    p.add_argument("root")
    p.add_argument("--n_jobs", "--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        doc = warmup_index(args.root, n_jobs=args.n_jobs, progress=True)
    except FileNotFoundError as e:
        print(f"warmup_data: error: {e}", file=sys.stderr)
        return 1
    total = sum(e["count"] for e in doc["shards"].values())
    print(
        f"indexed {len(doc['shards'])} shards, {total} samples, left out {len(doc['left_out'])} "
        f"-> {Path(args.root) / INDEX_NAME}"
    )
    return 1 if doc["left_out"] else 0
