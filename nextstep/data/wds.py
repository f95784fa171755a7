"""Training data pipeline: a weighted, deterministic, resumable stream of decoded Samples from tar shards.

Order is a pure function of (seed, epoch, rank, worker): shards are shuffled per dataset epoch and split
over rank x worker slots, samples pass a seeded shuffle buffer, a counter-based RNG picks the dataset of
each draw, and same-bucket samples are batched in the worker. A loader position (per-slot dataset
epochs, samples taken, samples waiting in buckets) resumes the exact remaining stream.
"""

from __future__ import annotations

import logging
import random
import signal
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nextstep.data.buckets import nearest_bucket, resize_center_crop, to_tensor
from nextstep.data.config import DataConfig
from nextstep.data.format import PLACEHOLDER_RE, RawSample, Sample, decode_sample, iter_raw_samples
from nextstep.data.stream import DatasetStream, NoReadableSamples, expand_shards, open_shard, seed_of

log = logging.getLogger(__name__)

STATE_VERSION = 1
Bucket = tuple[int, ...] | None  # (H, W) in pixels, (C, h, w) for latents; None groups text-only samples


def drop_caption_text(caption: str) -> str:
    """Keep only the image placeholders: "a <image_0> b <image_1>" -> "<image_0><image_1>"."""
    return "".join(m.group(0) for m in PLACEHOLDER_RE.finditer(caption))


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
            rng = random.Random(seed_of(*self.key, chunk))
            self._values = [rng.random() for _ in range(self.CHUNK)]
            self._chunk = chunk
        return self._values[i % self.CHUNK]


@dataclass
class _Ref:
    """Where a sample came from, enough to fetch it again after a resume."""

    dataset: int
    url: str
    key: str
    dropped: bool  # whether caption dropout hit it


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
    """Per-worker batch stream; yields (collated batch, worker position info) tuples for `WdsLoader`, and
    (None, info) for the end of a one-pass worker (its final counts) or a dataset without readable samples."""

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
        run = _WorkerRun(self, worker)
        try:
            yield from run.batches()
        except NoReadableSamples as e:  # raised again by WdsLoader in the main process: one line, no worker trace
            yield None, {"worker": worker, "error": str(e)}
            return
        # One-pass mode: the counts after the last batch (a shard that failed after it is counted too).
        yield None, {"worker": worker, "stats": run.state()["stats"]}


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
        self.streams = [DatasetStream(i, urls, cfg, self.slot, num_slots, self.stats) for i, urls in enumerate(ds.urls)]
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
            sample = decode_sample(raw)
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
            if "error" in info:
                raise NoReadableSamples(info["error"])
            if batch is None:  # a worker's pass has ended
                self._stats[info["worker"]] = info["stats"]
                continue
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
