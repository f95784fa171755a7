"""Request batching for the image server: queued requests that share generation options run as one pipeline call,
cancelled between image tokens once every request of the batch has gone (client disconnected or deadline passed).

Reproducibility: each request draws its noise from its own generator seeded with its seed, so its images do not
depend on which requests share its batch (up to float rounding of the batch shape), and a request served alone
gives exactly `pipe.generate(prompt, n=n, seed=seed, ...)`, the images of `nextstep generate --seed`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from nextstep.sampling.pipeline import OnToken, Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one pipeline call."""

    kind: str  # "generate" or "edit"
    options: tuple[tuple[str, object], ...]  # pipeline options as sorted (name, value) pairs; seed and n excluded


@dataclass(eq=False)
class Job:
    """One request waiting for its images."""

    key: BatchKey
    prompt: str  # the caption, or the instruction of an edit
    seed: int  # the request's own noise generator
    n: int  # images to make
    image: Image.Image | None = None  # the source image of an edit
    arrived: float = field(default_factory=time.monotonic)  # seconds, time.monotonic clock
    deadline: float = math.inf  # time.monotonic() after which nobody waits for the images
    future: asyncio.Future | None = None  # set by Batcher.submit; resolves to list[Image]

    def gone(self) -> bool:
        """Nobody waits for this job any more: its future was cancelled (or answered) or its deadline passed.
        Read from the worker thread: done() only reads the future's state."""
        return self.future.done() or time.monotonic() > self.deadline


class Cancelled(Exception):
    """Raised between image tokens to stop a batch whose requests have all gone."""


class QueueFull(Exception):
    """The batcher holds its limit of waiting requests."""


@dataclass
class BatchStats:
    """Counters of the batcher, for /metrics."""

    batches: int = 0  # pipeline calls
    requests: int = 0  # requests served, failed included
    images: int = 0  # images asked for by served requests
    failed: int = 0  # requests whose pipeline call raised
    rejected: int = 0  # requests refused because the queue was full
    cancelled: int = 0  # requests whose batch stopped early because all of its requests had gone
    batch_images: Counter = field(default_factory=Counter)  # images per pipeline call -> calls
    batch_requests: Counter = field(default_factory=Counter)  # requests per pipeline call -> calls


def _draws(seeds: list[int], counts: list[int], device: torch.device) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """A draw function giving rows of request i from generator seeds[i]: a (B, D) draw is counts[i] rows each.

    Matches the pipeline's own draw, torch.randn(shape, generator=Generator().manual_seed(seed)), for one request.
    """
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        parts = [
            torch.randn((k, *shape[1:]), generator=g, device=device, dtype=torch.float32)
            for g, k in zip(gens, counts, strict=True)
        ]
        return torch.cat(parts)  # (B, D)

    return draw


def run_batch(pipe: Pipeline, jobs: list[Job], on_token: OnToken | None = None) -> list[list[Image.Image]]:
    """One pipeline call for jobs of one key; returns each job's images. Blocking: run it off the event loop.

    Each job's rows draw from its own generator (through the pipeline's `draw` hook, which the eager loop
    and the fast engine both honour), so a request's images do not depend on its batch-mates.
    """
    key = jobs[0].key
    prompts = [job.prompt for job in jobs for _ in range(job.n)]
    device = pipe.model.embed_tokens.weight.device
    draw = _draws([job.seed for job in jobs], [job.n for job in jobs], device)
    options = {**dict(key.options), "n": 1, "seed": jobs[0].seed, "draw": draw, "on_token": on_token}
    if key.kind == "edit":
        images = pipe.edit([job.image for job in jobs for _ in range(job.n)], prompts, **options)
    else:
        images = pipe.generate(prompts, **options)
    out, start = [], 0
    for job in jobs:
        out.append(images[start : start + job.n])
        start += job.n
    return out


class Batcher:
    """Collects submitted jobs of one key for up to `max_wait_s` (from the oldest one's arrival) or until
    `max_batch` images, then runs them as one `run(jobs, on_token)` call in a worker thread, one call at a time.

    `run` calls on_token after each image token: it records progress (for `stalled_s`) and raises Cancelled
    when every job of the batch has gone. A failed call is retried job by job, so one bad request fails alone.
    """

    def __init__(
        self,
        run: Callable[[list[Job], OnToken], list[list[Image.Image]]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
    ):
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._pending: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._progress: float | None = None  # time.monotonic() of the running batch's last token; None: idle

    @property
    def stalled_s(self) -> float:
        """Seconds since the running batch last made progress (0 when idle)."""
        progress = self._progress
        return 0.0 if progress is None else time.monotonic() - progress

    def _watch(self, batch: list[Job]) -> OnToken:
        def on_token(k: int, tokens) -> None:
            self._progress = time.monotonic()
            if all(job.gone() for job in batch):
                raise Cancelled(f"all {len(batch)} requests of the batch have gone (stopped after token {k})")

        return on_token

    @property
    def queued(self) -> int:
        self._prune()
        return len(self._pending)

    def _prune(self) -> None:
        """Forget jobs whose requests are gone (timed out) while they waited."""
        self._pending = deque(job for job in self._pending if not job.future.done())

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="nextstep-batcher")
        self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job; await the returned future for its images. Raises QueueFull at the queue limit."""
        if len(self._pending) >= self.max_queue:
            self._prune()
        if len(self._pending) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"{len(self._pending)} requests are waiting (limit {self.max_queue}); retry later")
        job.future = asyncio.get_running_loop().create_future()
        self._pending.append(job)
        self._arrived.set()
        return job.future

    def _fit(self, key: BatchKey) -> list[Job]:
        """Waiting jobs of `key` in arrival order, as many as fit in max_batch images (the first one always)."""
        batch, room = [], self.max_batch
        for job in self._pending:
            if job.key == key and (job.n <= room or not batch):
                batch.append(job)
                room -= job.n
        return batch

    async def _next_batch(self) -> list[Job]:
        while True:
            self._prune()
            timeout = None
            if self._pending:
                first = self._pending[0]
                batch = self._fit(first.key)
                timeout = first.arrived + self.max_wait_s - time.monotonic()
                if sum(job.n for job in batch) >= self.max_batch or timeout <= 0:
                    for job in batch:
                        self._pending.remove(job)
                    return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _loop(self) -> None:
        while True:
            await self._serve(await self._next_batch())

    async def _serve(self, batch: list[Job]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.batch_images[sum(job.n for job in batch)] += 1
        stats.batch_requests[len(batch)] += 1
        start = time.perf_counter()
        self._progress = time.monotonic()
        try:
            results = await asyncio.to_thread(self.run, batch, self._watch(batch))
        except Cancelled as e:
            log.info("%s", e)
            stats.cancelled += len(batch)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        except Exception as e:
            if len(batch) > 1:
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(batch), e)
                for job in batch:
                    await self._serve([job])
                return
            stats.requests += 1
            stats.failed += 1
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        finally:
            self._progress = None
        log.info(
            "batch: %d requests, %d images in %.3f s",
            len(batch),
            sum(job.n for job in batch),
            time.perf_counter() - start,
        )
        for job, images in zip(batch, results, strict=True):
            stats.requests += 1
            stats.images += job.n
            if not job.future.done():
                job.future.set_result(images)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batcher stopped; requests will time out", exc_info=task.exception())
