"""Streamed partial images (`stream=true`): server-sent events in the shape of the OpenAI Images API's streaming.

curl -N 127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \
    -d '{"prompt": "a red fox", "seed": 0, "stream": true, "partial_images": 2}'

event: image_generation.partial_image     (image_edit.partial_image on /v1/images/edits)
data: {"type": "image_generation.partial_image", "b64_json": "...", "partial_image_index": 0, "image_index": 0, ...}

event: image_generation.completed         (image_edit.completed)
data: {"type": "image_generation.completed", "b64_json": "...", "image_index": 0, "seed": 0, ...}

A failure once the stream has started ends it with `event: error`, data {"type": "error", "error": {...}} (the
JSON error body of a non-streamed request). `partial_images` (0-3, default 1) partial images are spread evenly
over the image-token rows: the rows drawn so far decoded, the rows below flat (nextstep.sampling.partial); the
final image is the pipeline's own, equal to the non-streamed one of the same seed.

Streams go through the micro-batcher like any request: a batch may mix streamed and plain requests of the same
options, and its on_token hook decodes each streamed job's own rows of the batch at that job's rows and hands
them to its stream. Running streams alone would serialise them against the batcher anyway (one pipeline, one
call at a time) and lose the batching; this way a stream costs only its own partial decodes. A client that
disconnects cancels its job, and the batch stops early once all of its jobs are gone, as for plain requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse
from PIL import Image

from nextstep.sampling.partial import decode_partial
from nextstep.sampling.pipeline import OnToken, Pipeline
from nextstep.serve.batching import Job
from nextstep.serve.middleware import ApiError

MAX_PARTIAL_IMAGES = 3  # as OpenAI's API
DEFAULT_PARTIAL_IMAGES = 1  # OpenAI's default is 0; one partial image (half the grid) costs ~6% (BENCHMARKS.md)
DONE = object()  # queued after a streamed job's last partial image: its future has resolved


def partial_rows(grid_rows: int, count: int) -> tuple[int, ...]:
    """The image-token rows after which `count` partial images are sent, spread evenly, the last row excluded
    (it is the final image): 8 rows, 3 images -> (2, 4, 6). Fewer when the grid has fewer rows."""
    return tuple(sorted({math.ceil(i * grid_rows / (count + 1)) for i in range(1, count + 1)} - {0, grid_rows}))


@dataclass(eq=False)
class StreamJob(Job):
    """A job whose partial images go to its stream: after each of `rows`, the images of its own batch rows."""

    rows: tuple[int, ...] = ()
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (row, [PIL images]) items, then DONE
    loop: asyncio.AbstractEventLoop | None = None  # the server's loop: partial images are queued from the worker
    sent_row: int = 0  # last row sent: a batch retried job by job does not send a row twice

    @classmethod
    def of(cls, job: Job, rows: tuple[int, ...]) -> StreamJob:
        plain = {f.name: getattr(job, f.name) for f in dataclasses.fields(Job)}
        return cls(**plain, rows=rows, loop=asyncio.get_running_loop())

    def push(self, row: int, images: list[Image.Image]) -> None:
        """From the worker thread: hand a partial image to the stream (FIFO with the future's result)."""
        self.sent_row = row
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, images))


def with_partials(pipe: Pipeline, jobs: list[Job], on_token: OnToken) -> OnToken:
    """The batch's on_token followed by the partial images of its streamed jobs (each one's own batch rows)."""
    size = dict(jobs[0].key.options)["size"]  # (height, width): one per batch key
    w = size[1] // pipe.down_factor
    starts = [sum(job.n for job in jobs[:i]) for i in range(len(jobs))]  # each job's first row in the batch
    streams = [(job, start) for job, start in zip(jobs, starts, strict=True) if isinstance(job, StreamJob)]
    if not streams:
        return on_token

    def hook(k: int, tokens: torch.Tensor) -> None:  # tokens: (B, k + 1, D)
        on_token(k, tokens)  # raises Cancelled when every job of the batch has gone
        row, rest = divmod(k + 1, w)
        for job, start in streams:
            if not rest and row in job.rows and row > job.sent_row and not job.gone():
                job.push(row, decode_partial(pipe, tokens[start : start + job.n], size))

    return hook


@dataclass
class StreamStats:
    """Counters of streamed requests, for /metrics."""

    started: int = 0  # streams opened (200 sent)
    completed: int = 0  # streams that sent their final images
    failed: int = 0  # streams ended by an error event (timeout and generation failures)
    disconnected: int = 0  # streams whose client went away before the final images
    partial_images: int = 0  # partial image events sent


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def error_event(e: ApiError) -> str:
    """A failure once a stream has started: the JSON error body of a non-streamed request, as an `error` event."""
    return sse("error", {"type": "error", **json.loads(e.response().body)})


def stream_response(server, job: Job, partial_images: int, request: Request, parent=None) -> StreamingResponse:
    """Queue a streamed job and answer its events. Called once the request is valid: refusals so far (and a
    full queue, 429) are JSON errors; from here on, errors are events."""
    from nextstep.serve.api import png_base64  # lazily: the route module imports this one

    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise ApiError(
            f"partial_images must be from 0 to {MAX_PARTIAL_IMAGES}, got {partial_images}", param="partial_images"
        )
    h, w = (side // server.pipe.down_factor for side in dict(job.key.options)["size"])
    job = StreamJob.of(job, partial_rows(h, partial_images))
    future = server.submit(job)
    future.add_done_callback(lambda _: job.queue.put_nowait(DONE))
    prefix = "image_edit" if job.image is not None else "image_generation"
    stats = server.streams
    common = {"size": f"{w * server.pipe.down_factor}x{h * server.pipe.down_factor}", "quality": "auto"}
    common |= {"background": "opaque", "output_format": "png"}

    def event(kind: str, image: Image.Image, **extra) -> str:
        data = {"type": f"{prefix}.{kind}", "b64_json": png_base64(image), "created_at": int(time.time())}
        return sse(f"{prefix}.{kind}", data | common | extra)

    async def events() -> AsyncIterator[str]:
        stats.started += 1
        index = 0
        try:
            while (item := await next_item(server, job, request)) is not DONE:
                _, images = item
                for i, image in enumerate(images):
                    extra = {"partial_image_index": index, "image_index": i}
                    yield await asyncio.to_thread(event, "partial_image", image, **extra)
                index += 1
                stats.partial_images += len(images)
            images = future.result()
        except ApiError as e:
            stats.disconnected += e.status == 499
            stats.failed += e.status != 499
            yield error_event(e)
            return
        except asyncio.CancelledError:  # the client went away and the response was cancelled
            stats.disconnected += 1
            raise
        finally:
            future.cancel()  # no-op once answered; else the batch stops at its next token if nobody else waits
        items = await asyncio.to_thread(server.items, job, images, parent)  # each PNG with its record
        for i, item in enumerate(items):
            data = {"type": f"{prefix}.completed", "created_at": int(time.time()), **item}
            yield sse(f"{prefix}.completed", data | common | {"image_index": i, "seed": job.seed})
        stats.completed += 1

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def next_item(server, job: StreamJob, request: Request):
    """The stream's next (row, images) or DONE; ApiError at the deadline (504), on a client disconnect (499) or
    when the generation failed (as the non-streamed request would)."""
    from nextstep.serve.api import DISCONNECT_POLL_S

    timeout = ApiError(f"request timed out after {server.config.timeout_s:g} s", status=504, kind="timeout")
    while True:
        left = job.deadline - time.monotonic()
        if left <= 0:
            raise timeout
        try:
            item = await asyncio.wait_for(job.queue.get(), min(left, DISCONNECT_POLL_S))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError("client closed the request", status=499, kind="client_closed") from None
            continue
        if item is DONE and not job.future.cancelled() and job.future.exception() is not None:
            if time.monotonic() > job.deadline:  # the batch stopped because the deadline had passed
                raise timeout
            raise server.failure(job.future.exception())
        return item
