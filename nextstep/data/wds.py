"""Training data pipeline: a weighted, deterministic, resumable stream of decoded Samples from tar shards.

Order is a pure function of (seed, epoch, rank, worker): shards are shuffled per dataset epoch and split
over rank x worker slots, samples pass a seeded shuffle buffer, a counter-based RNG picks the dataset of
each draw, and same-bucket samples are batched in the worker. A loader position (per-slot dataset
epochs, samples taken, samples waiting in buckets) resumes the exact remaining stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import signal
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import IO, Any

import braceexpand
import fsspec
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nextstep.data.buckets import make_buckets, nearest_bucket, resize_center_crop, to_tensor
from nextstep.data.format import PLACEHOLDER_RE, RawSample, Sample, decode_sample, iter_raw_samples
from nextstep.data.tools import load_index

log = logging.getLogger(__name__)

STATE_VERSION = 1
Bucket = tuple[int, ...] | None  # (H, W) in pixels, (C, h, w) for latents; None groups text-only samples


@dataclass
class DatasetSpec:
    """One dataset of the mixture."""

    # Shards: local paths, directories (all *.tar inside), brace patterns "data-{000000..000099}.tar",
    # fsspec URLs ("s3://b/x-{0..9}.tar") or "pipe:<command writing the tar to stdout>"; str or list.
    shards: str | list[str] = ""
    weight: float = 1.0  # relative probability of drawing from this dataset
    name: str = ""  # label in logs and stats; defaults to "dataset<i>"

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"dataset {self.name!r}: weight must be positive and finite, got {self.weight}")
        if not self.shards:
            raise ValueError(f"dataset {self.name!r}: shards is empty")


@dataclass
class DataConfig:
    """Everything that decides which samples come out, in which order and shape."""

    datasets: list[DatasetSpec] = field(default_factory=list)  # the mixture; dicts are converted
    image_size: int = 256  # buckets hold about image_size**2 pixels; official stages: 256, then 512
    # Aspect ratios (W/H) of the resolution buckets; images go to the bucket of nearest log-ratio.
    aspect_ratios: tuple[float, ...] = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
    buckets: list[tuple[int, int]] | None = None  # explicit (H, W) buckets; None derives them from above
    bucket_multiple: int = 16  # bucket sides are multiples of this (VAE stride 8 x patch 2)
    batch_size: int = 8  # samples per batch, per rank; every batch holds one bucket
    caption_drop_prob: float = 0.1  # chance a sample's caption text becomes "" (CFG); placeholders stay
    shuffle_buffer: int = 500  # samples mixed per worker slot across shard boundaries; 0 disables
    loop: bool = True  # True: endless stream, each dataset restarts with a new epoch when exhausted;
    # False: one epoch of every dataset (set_epoch picks which), then partial batches are flushed
    num_workers: int = 4  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches prefetched per worker
    seed: int = 0  # base seed of every random choice in the pipeline

    def __post_init__(self) -> None:
        self.datasets = [
            DatasetSpec(**d) if isinstance(d, dict) else d for d in self.datasets
        ]  # JSON-loaded configs arrive as dicts
        for i, spec in enumerate(self.datasets):
            spec.name = spec.name or f"dataset{i}"
        if self.image_size % self.bucket_multiple:
            raise ValueError(f"image_size must be a multiple of {self.bucket_multiple}, got {self.image_size}")
        if not 0 <= self.caption_drop_prob <= 1:
            raise ValueError(f"caption_drop_prob must be in [0, 1], got {self.caption_drop_prob}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0; got "
                f"{self.batch_size}, {self.num_workers}, {self.shuffle_buffer}"
            )
        if self.buckets is not None:
            self.buckets = [tuple(b) for b in self.buckets]
            bad = [b for b in self.buckets if b[0] % self.bucket_multiple or b[1] % self.bucket_multiple]
            if bad or not self.buckets:
                raise ValueError(f"buckets must be non-empty (H, W) multiples of {self.bucket_multiple}: {bad}")

    def resolved_buckets(self) -> list[tuple[int, int]]:
        """The (H, W) buckets in use."""
        return self.buckets or make_buckets(self.image_size, self.aspect_ratios, multiple=self.bucket_multiple)


def drop_caption_text(caption: str) -> str:
    """Keep only the image placeholders: "a <image_0> b <image_1>" -> "<image_0><image_1>"."""
    return "".join(m.group(0) for m in PLACEHOLDER_RE.finditer(caption))


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


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class _CounterRNG:
    """Uniform draws addressed by index, so any position can be reproduced without replaying the rest."""

    CHUNK = 1024

    def __init__(self, *key: Any) -> None:
        self.key = key
        self._chunk = -1
        self._values: list[float] = []

    def uniform(self, i: int) -> float:
        chunk = i // self.CHUNK
        if chunk != self._chunk:
            rng = random.Random(_seed(*self.key, chunk))
            self._values = [rng.random() for _ in range(self.CHUNK)]
            self._chunk = chunk
        return self._values[i % self.CHUNK]


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
class _Ref:
    """Where a sample came from, enough to fetch it again after a resume."""

    dataset: int
    url: str
    key: str
    dropped: bool  # whether caption dropout hit it


@dataclass
class _Cursor:
    """Where an epoch's generator stands: next shard and sample in it, samples seen, buffer contents."""

    shard: int = 0  # position in the slot's shard list
    ordinal: int = 0  # next sample within that shard
    seen: int = 0  # samples read this epoch before the slot filter (for the sample split)
    buffer: list = field(default_factory=list)
    rng_state: tuple | None = None


class _DatasetStream:
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
        raise RuntimeError(f"dataset {self.cfg.datasets[self.index].name!r}: no readable samples in any shard")

    def _shards(self, epoch: int) -> tuple[list[str], bool]:
        order = random.Random(_seed("shards", self.cfg.seed, self.index, epoch)).sample(self.urls, len(self.urls))
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
        buffer = _ShuffleBuffer(self.cfg.shuffle_buffer, _seed("buffer", self.cfg.seed, self.index, epoch, self.slot))
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


@dataclass
class Batch:
    """Default collate output: the samples of one bucket and all their images stacked in sequence order."""

    samples: list[Sample]  # images are uint8 tensors (3, H, W) (buckets.normalize_pixels), or latents
    images: torch.Tensor | None  # (N, 3, H, W), N = total images in the batch; None for text-only batches
    bucket: Bucket  # (H, W) of every image in the batch


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack every image of the batch (all share one bucket) into one tensor for a single VAE encode."""
    images = [im for s in samples for im in s.images]
    stacked = torch.stack(images) if images else None
    return Batch(samples=samples, images=stacked, bucket=tuple(images[0].shape[1:]) if images else None)


class WdsDataset(IterableDataset):
    """Per-worker batch stream; yields (collated batch, worker position info) tuples for `WdsLoader`."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Sample], Any] | None = None,
        collate: Callable[[list], Any] = collate_samples,
    ) -> None:
        if not cfg.datasets:
            raise ValueError("DataConfig.datasets is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.transform, self.collate = transform, collate
        self.urls = [expand_shards(spec.shards) for spec in cfg.datasets]
        for spec, urls in zip(cfg.datasets, self.urls, strict=True):
            if not urls:
                raise ValueError(f"dataset {spec.name!r}: no shards match {spec.shards!r}")
        self.buckets = cfg.resolved_buckets()
        self.epoch = 0  # one-pass mode: which epoch to read
        self.worker_offset = 0  # physical worker w plays logical worker (w + offset) % num_workers
        self.slot_states: dict[int, dict] = {}  # logical worker -> position to resume from

    def num_workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def __iter__(self) -> Iterator[tuple[Any, dict]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.worker_offset) % self.num_workers()
        yield from _WorkerRun(self, worker).batches()


class _WorkerRun:
    """State of one logical worker while it produces batches."""

    def __init__(self, ds: WdsDataset, worker: int) -> None:
        cfg = ds.cfg
        self.ds, self.cfg, self.worker = ds, cfg, worker
        num_workers = ds.num_workers()
        self.slot = ds.rank * num_workers + worker
        num_slots = ds.world_size * num_workers
        self.stats = {
            "samples": 0,
            "sample_errors": 0,
            "shard_errors": 0,
            "per_dataset": [0] * len(cfg.datasets),
        }
        self.streams = [
            _DatasetStream(i, urls, cfg, self.slot, num_slots, self.stats) for i, urls in enumerate(ds.urls)
        ]
        self.weights = [spec.weight for spec in cfg.datasets]
        self.mix_rng = _CounterRNG("mix", cfg.seed, self.slot)
        self.pending: dict[Bucket, list[tuple[Sample, _Ref]]] = {}
        self.step = 0  # dataset draws so far
        self.batches_out = 0
        state = ds.slot_states.get(worker)
        if state is not None:
            self._restore(state)
        else:
            for s in self.streams:
                s.epoch = ds.epoch

    def _restore(self, state: dict) -> None:
        self.step, self.batches_out = state["step"], state["batches"]
        for stream, pos in zip(self.streams, state["datasets"], strict=True):
            stream.seek(pos["epoch"], pos["taken"], pos["done"])
        refs = [_Ref(**r) for r in state["pending"]]
        fetched = _fetch(refs)
        for ref in refs:
            raw = fetched.get((ref.url, ref.key))
            sample = self._process(raw, ref) if raw is not None else None
            if sample is None:
                log.warning("sample %s of %s waiting in a bucket could not be re-read; dropped", ref.key, ref.url)
                continue
            self.pending.setdefault(_bucket_of(sample), []).append((sample, ref))
        self.stats.update(state["stats"])  # after the replay above, which re-counted old errors

    def state(self) -> dict:
        return {
            "step": self.step,
            "batches": self.batches_out,
            "datasets": [s.position() for s in self.streams],
            "pending": [asdict(ref) for items in self.pending.values() for _, ref in items],
            "stats": {k: list(v) if isinstance(v, list) else v for k, v in self.stats.items()},
        }

    def _draw(self) -> int | None:
        active = [i for i, s in enumerate(self.streams) if not s.done]
        if not active:
            return None
        cum = list(accumulate(self.weights[i] for i in active))
        u = self.mix_rng.uniform(self.step) * cum[-1]
        self.step += 1
        return active[min(bisect_right(cum, u), len(active) - 1)]

    def _process(self, raw: RawSample, ref: _Ref) -> Sample | None:
        try:
            sample = decode_sample(raw, load=False)
            if sample.images and not isinstance(sample.images[0], torch.Tensor):  # latents keep their size
                bucket = nearest_bucket(*sample.images[0].size, self.ds.buckets)
                # Resized PIL images wait in the buckets: a quarter of the memory of float tensors.
                sample.images = [resize_center_crop(im, bucket) for im in sample.images]
        except Exception as e:  # undecodable sample: count, log, skip
            self.stats["sample_errors"] += 1
            log.warning("skipping sample %s in %s: %s", ref.key, ref.url, e)
            return None
        if ref.dropped:
            sample.caption = drop_caption_text(sample.caption)
        return sample

    def _emit(self, bucket: Bucket) -> tuple[Any, dict]:
        items = self.pending.pop(bucket)
        samples = [s for s, _ in items]
        for s in samples:
            s.images = [im if isinstance(im, torch.Tensor) else to_tensor(im) for im in s.images]
        if self.ds.transform is not None:
            samples = [self.ds.transform(s) for s in samples]
        self.batches_out += 1
        return self.ds.collate(samples), {"worker": self.worker, "state": self.state()}

    def batches(self) -> Iterator[tuple[Any, dict]]:
        drop_rng = [_CounterRNG("drop", self.cfg.seed, self.slot, i) for i in range(len(self.streams))]
        while (d := self._draw()) is not None:
            stream = self.streams[d]
            item = stream.next()
            if item is None:
                continue
            url, raw = item
            # Keyed by (epoch, position) so the same sample gets the same decision after a resume.
            u = drop_rng[d].uniform(stream.epoch * (1 << 40) + stream.taken)
            ref = _Ref(d, url, raw.key, bool(raw.images) and u < self.cfg.caption_drop_prob)
            sample = self._process(raw, ref)
            if sample is None:
                continue
            self.stats["samples"] += 1
            self.stats["per_dataset"][d] += 1
            bucket = _bucket_of(sample)
            self.pending.setdefault(bucket, []).append((sample, ref))
            if len(self.pending[bucket]) == self.cfg.batch_size:
                yield self._emit(bucket)
        for bucket in list(self.pending):  # one-pass mode: flush partial batches so no sample is lost
            yield self._emit(bucket)


def _bucket_of(sample: Sample) -> Bucket:
    if not sample.images:
        return None
    first = sample.images[0]
    return tuple(first.shape) if isinstance(first, torch.Tensor) else (first.height, first.width)


def _fetch(refs: list[_Ref]) -> dict[tuple[str, str], RawSample]:
    """Raw samples named by refs, reading each needed shard once up to its last needed key."""
    wanted: dict[str, set[str]] = {}
    for ref in refs:
        wanted.setdefault(ref.url, set()).add(ref.key)
    out = {}
    for url, keys in wanted.items():
        try:
            with open_shard(url) as f:
                for raw in iter_raw_samples(f):
                    if raw.key in keys:
                        out[(url, raw.key)] = raw
                        keys.discard(raw.key)
                        if not keys:
                            break
        except Exception as e:
            log.warning("cannot re-read %s: %s", url, e)
    return out


class WdsLoader:
    """Iterable of batches over a WdsDataset with a resumable position (`state_dict`/`load_state_dict`)."""

    def __init__(self, dataset: WdsDataset) -> None:
        self.dataset = dataset
        self._states: dict[int, dict] = {}  # logical worker -> position after its last consumed batch
        self._stats: dict[int, dict] = {}  # logical worker -> its counters in the current or last pass
        self._next_worker = 0

    def set_epoch(self, epoch: int) -> None:
        """One-pass mode: read epoch `epoch` of every dataset on the next iteration."""
        self.dataset.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        ds, n = self.dataset, self.dataset.num_workers()
        ds.slot_states, ds.worker_offset = dict(self._states), self._next_worker
        self._stats = {k: v["stats"] for k, v in self._states.items()}
        cfg = ds.cfg
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        for batch, info in loader:
            self._states[info["worker"]] = info["state"]
            self._stats[info["worker"]] = info["state"]["stats"]
            self._next_worker = (info["worker"] + 1) % n
            yield batch
        # A finished pass starts the next one from the top of the next epoch.
        self._states, self._next_worker = {}, 0
        ds.epoch += 1

    def stats(self) -> dict:
        """Samples yielded and errors skipped in the current (or last finished) pass, summed over workers."""
        total = {
            "samples": 0,
            "sample_errors": 0,
            "shard_errors": 0,
            "per_dataset": [0] * len(self.dataset.urls),
        }
        for stats in self._stats.values():
            for k, v in stats.items():
                total[k] = [a + b for a, b in zip(total[k], v, strict=True)] if isinstance(v, list) else total[k] + v
        return total

    def state_dict(self) -> dict:
        """The position after the last batch yielded; JSON-serializable."""
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": ds.num_workers(),
            "seed": ds.cfg.seed,
            "epoch": ds.epoch,
            "next_worker": self._next_worker,
            "workers": {str(k): v for k, v in self._states.items()},
        }

    def restart_after(self, state: dict) -> int:
        """Elastic resume: `state` came from another world size or worker count, so its per-worker positions
        do not map onto this loader. Start every dataset at the epoch after the furthest one `state` reached
        (the rest of the interrupted epoch is skipped, nothing is repeated); returns that epoch."""
        epochs = [state.get("epoch", 0)]
        for worker in state.get("workers", {}).values():
            epochs += [pos["epoch"] for pos in worker.get("datasets", [])]
        self.dataset.epoch, self._next_worker, self._states = max(epochs) + 1, 0, {}
        return self.dataset.epoch

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields exactly what an uninterrupted run would have yielded next."""
        ds = self.dataset
        expected = (STATE_VERSION, ds.rank, ds.world_size, ds.num_workers(), ds.cfg.seed)
        got = tuple(state.get(k) for k in ("version", "rank", "world_size", "num_workers", "seed"))
        if got != expected:
            raise ValueError(f"data state (version, rank, world_size, num_workers, seed)={got} != {expected}")
        ds.epoch = state["epoch"]
        self._next_worker = state["next_worker"]
        self._states = {int(k): v for k, v in state["workers"].items()}


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM (which `timeout`, job schedulers and Ctrl-C send to the whole process
    group) to the main process, which finishes its step, saves and stops; a worker killed by SIGTERM would
    make the DataLoader raise in the main process before it saved. Workers still end: the DataLoader stops
    them on shutdown, and each exits by itself within seconds once the main process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    tokenizer_fn: Callable[[Sample], Any] | None = None,
    collate: Callable[[list], Any] | None = None,
) -> WdsLoader:
    """Batches for this rank. `tokenizer_fn` maps each Sample (in the worker) to what `collate` batches;
    without it batches are `Batch`es; with it and no `collate`, batches are lists of its outputs."""
    if seed is not None and seed != cfg.seed:
        cfg = replace(cfg, seed=seed)
    collate = collate or (collate_samples if tokenizer_fn is None else list)
    dataset = WdsDataset(cfg, rank=rank, world_size=world_size, transform=tokenizer_fn, collate=collate)
    if rank == 0:
        for spec, urls in zip(cfg.datasets, dataset.urls, strict=True):
            log.info("dataset %s: %d shards, weight %g", spec.name, len(urls), spec.weight)
    return WdsLoader(dataset)
