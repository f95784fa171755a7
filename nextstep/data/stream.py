"""One dataset's raw samples for one worker slot: shard listing and opening, the per-epoch shard order, a
seeded shuffle buffer, and a position (epoch, samples taken) that resumes the exact remaining stream, by byte
offset when the shards have a verified warmup index (`nextstep.data.index`)."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import braceexpand
import fsspec
import webdataset

from nextstep.data.config import DataConfig
from nextstep.data.format import RawSample, iter_raw_samples
from nextstep.data.index import load_index

log = logging.getLogger(__name__)


def seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def expand_shards(shards: str | list[str]) -> list[str]:
    """Shard URLs of a spec: brace patterns expanded, directories listed (sorted *.tar)."""
    out: list[str] = []
    for entry in [shards] if isinstance(shards, str) else shards:
        if entry.startswith("pipe:"):
            out.append(entry)
            continue
        for url in braceexpand.braceexpand(entry):
            if "://" not in url and Path(url).is_dir():
                out += sorted(str(p) for p in Path(url).glob("*.tar"))
            else:
                out.append(url)
    return out


def open_shard(url: str) -> IO[bytes]:
    """Binary stream of one shard: local file, `pipe:` command (exit status checked on close) or URL."""
    if url.startswith("pipe:"):
        return webdataset.gopen(url, "rb")
    if "://" not in url:
        return open(url, "rb", buffering=1 << 20)
    return fsspec.open(url, "rb").open()


class NoReadableSamples(ValueError):
    """A dataset whose shards gave no usable sample in a whole epoch (each shard and sample was logged)."""


class _ShuffleBuffer:
    """Seeded reservoir shuffle: holds up to `size` items, emits a random one per push once full."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)
        self.items: list = []

    def push(self, item: Any) -> Any | None:
        if self.size == 0:
            return item
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        j = self.rng.randrange(self.size)
        out, self.items[j] = self.items[j], item
        return out

    def pop(self) -> Any | None:
        if not self.items:
            return None
        j = self.rng.randrange(len(self.items))
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        return self.items.pop()


@dataclass
class _Cursor:
    """Where an epoch's generator stands: next shard and sample in it, samples seen, buffer contents."""

    shard: int = 0  # position in the slot's shard list
    ordinal: int = 0  # next sample within that shard
    seen: int = 0  # samples read this epoch before the slot filter (for the sample split)
    buffer: list = field(default_factory=list)
    rng_state: tuple | None = None


class DatasetStream:
    """Raw samples of one dataset for one worker slot, epoch after epoch, positioned by (epoch, taken)."""

    def __init__(self, index: int, urls: list[str], cfg: DataConfig, slot: int, num_slots: int, stats: dict) -> None:
        self.index, self.urls, self.cfg, self.stats = index, urls, cfg, stats
        self.slot, self.num_slots = slot, num_slots
        self.epoch, self.taken, self.done = 0, 0, False
        self._it: Iterator[tuple[str, Any]] | None = None
        self._cursor = _Cursor()

    def position(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "done": self.done}

    def seek(self, epoch: int, taken: int = 0, done: bool = False) -> None:
        """Position the stream after the first `taken` samples of `epoch`.

        With a verified warmup index for every shard involved, the shuffle buffer is replayed on sample
        numbers and only the samples still buffered are read (by byte offset); otherwise the epoch prefix
        is re-read without decoding.
        """
        self.epoch, self.taken, self.done = epoch, 0, done
        index = self._index(epoch) if taken else None
        if index is None:
            self._it = self._epoch_items(epoch)
        else:
            counts = lambda url, skip: ((url, o) for o in range(skip, index[url]["count"]))  # noqa: E731
            sim = self._epoch_items(epoch, read=counts)
            for _ in range(taken):
                next(sim)
            c = self._cursor
            c.buffer = [(url, _read_at(url, index[url]["offsets"][o])) for url, o in c.buffer]
            self._it = self._epoch_items(epoch, start=c, offsets={u: e["offsets"] for u, e in index.items()})
            self.taken = taken
            log.debug("fast seek of %s to epoch %d sample %d", self.cfg.datasets[self.index].name, epoch, taken)
            return
        for _ in range(taken):
            if next(self._it, None) is None:
                break
            self.taken += 1

    def next(self) -> tuple[str, RawSample] | None:
        """Next (url, raw sample); None when one-pass mode has finished this dataset."""
        if self.done:
            return None
        if self._it is None:
            self.seek(self.epoch)
        for _ in range(2):  # a fresh epoch that yields nothing means the dataset has no readable data
            item = next(self._it, None)
            if item is not None:
                self.taken += 1
                return item
            if not self.cfg.loop:
                self.done = True
                return None
            empty = self.taken == 0
            self.seek(self.epoch + 1)
            if empty:
                break
        name = self.cfg.datasets[self.index].name
        raise NoReadableSamples(f"dataset {name!r}: no readable samples in its {len(self.urls)} shard(s)")

    def _shards(self, epoch: int) -> tuple[list[str], bool]:
        order = random.Random(seed_of("shards", self.cfg.seed, self.index, epoch)).sample(self.urls, len(self.urls))
        # Enough shards: each slot reads its own; too few: every slot reads all and keeps every n-th sample.
        by_shard = len(order) >= self.num_slots
        return (order[self.slot :: self.num_slots] if by_shard else order), by_shard

    def _index(self, epoch: int) -> dict[str, dict] | None:
        """Warmup index entries of this epoch's shards, or None unless every one is local and verified."""
        urls, _ = self._shards(epoch)
        if any(u.startswith("pipe:") or "://" in u for u in urls):
            return None
        index: dict[str, dict] = {}
        for parent in {str(Path(u).parent) for u in urls}:
            index.update(load_index(parent))
        index = {str(Path(u)): index.get(str(Path(u))) for u in urls}
        return None if None in index.values() else {u: index[str(Path(u))] for u in urls}

    def _epoch_items(
        self,
        epoch: int,
        *,
        read: Callable[[str, int], Iterator] | None = None,
        start: _Cursor | None = None,
        offsets: dict[str, list[int]] | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """(url, raw sample) of this slot's epoch, shuffled; `read(url, skip)` replaces shard reading."""
        urls, by_shard = self._shards(epoch)
        buffer = _ShuffleBuffer(self.cfg.shuffle_buffer, seed_of("buffer", self.cfg.seed, self.index, epoch, self.slot))
        c = start or _Cursor()
        if start is not None:
            buffer.items, self._cursor = list(start.buffer), _Cursor(start.shard, start.ordinal, start.seen)
            buffer.rng.setstate(start.rng_state)
        read = read or (lambda url, skip: ((url, raw) for raw in self._read_shard(url, offsets, skip)))
        seen = c.seen
        for si in range(c.shard, len(urls)):
            ordinal = c.ordinal if si == c.shard else 0
            for item in read(urls[si], ordinal):
                ordinal, seen = ordinal + 1, seen + 1
                if not by_shard and (seen - 1) % self.num_slots != self.slot:
                    continue
                out = buffer.push(item)
                if out is not None:
                    self._cursor = _Cursor(si, ordinal, seen, buffer.items, buffer.rng.getstate())
                    yield out
        while (out := buffer.pop()) is not None:
            self._cursor = _Cursor(len(urls), 0, seen, buffer.items, buffer.rng.getstate())
            yield out

    def _read_shard(self, url: str, offsets: dict[str, list[int]] | None, skip: int) -> Iterator[RawSample]:
        try:
            with open_shard(url) as f:
                if skip:  # only after a fast seek, which guarantees a local file with known offsets
                    if skip >= len(offsets[url]):
                        return
                    f.seek(offsets[url][skip])
                yield from iter_raw_samples(f)
        except Exception as e:  # missing file, truncated tar, bad member, failing pipe: skip the rest
            self.stats["shard_errors"] += 1
            log.warning("skipping rest of shard %s: %s: %s", url, type(e).__name__, e)


def _read_at(url: str, offset: int) -> RawSample:
    with open(url, "rb") as f:
        f.seek(offset)
        return next(iter_raw_samples(f))
