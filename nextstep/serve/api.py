"""OpenAI-compatible image API over a Pipeline: text-to-image and editing, with concurrent requests batched.

nextstep serve --model path/to/checkpoint --host 127.0.0.1 --port 8000
curl -s 127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \
    -d '{"prompt": "a red fox in the snow", "size": "512x512", "seed": 0}'
curl -s 127.0.0.1:8000/v1/images/edits -F image=@in.png -F prompt='make the sky blue'

Every image comes back as a PNG recording how it was made (sampling/chain.py): its item's `nextstep` field holds
the same record. Sending a result back as the `image` of an edit continues its chain (turn 2, 3, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from nextstep.args import ArgumentParser
from nextstep.io import MAX_PIXELS, encode_png
from nextstep.sampling.chain import KEY, Chain, edited, generated, parent_of, platform_of, run_options
from nextstep.sampling.options import (
    FIELDS,
    MAX_BATCH,
    MAX_PROMPT_TOKENS,
    GenerateOptions,
    OptionError,
    check_value,
    size_arg,
)
from nextstep.sampling.pipeline import Pipeline
from nextstep.serve.batching import Batcher, BatchKey, Job, QueueFull, run_batch
from nextstep.serve.inputs import fit_size, parse_size, read_image
from nextstep.serve.middleware import ApiError, BodyLimit, CountResponses
from nextstep.serve.stream import DEFAULT_PARTIAL_IMAGES, StreamStats, stream_response, with_partials

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still connected


@dataclass
class ServeConfig:
    model_name: str = "nextstep"  # the id of /v1/models; requests naming another model get 404
    max_batch: int = 16  # most images in one pipeline call (1 = no batching)
    max_wait_ms: float = 20.0  # how long the oldest waiting request waits for others to share its batch
    max_queue: int = 256  # waiting requests beyond this are answered 429
    timeout_s: float = 300.0  # per request, queueing included; beyond it 504
    max_n: int = 8  # images per request
    max_side: int = 1024  # largest image side in px, in and out
    max_steps: int = 100  # largest `steps`
    max_prompt_chars: int = 4000  # longest prompt or negative prompt, in characters
    max_body_bytes: int = 20 * 2**20  # largest request body (413 beyond)
    max_upload_pixels: int = MAX_PIXELS  # largest uploaded image, checked before decoding
    stall_s: float = 60.0  # /health answers 503 when a running batch has made no progress (image token) this long
    # GPU: decoding states (KV caches, CUDA graphs) kept, batches padded to a power of two (batch_buckets); a
    # state that does not fit in memory drops the others
    keep_states: int = 8
    default_size: tuple[int, int] | None = None  # (height, width) when a request names none; None: the checkpoint's

    def __post_init__(self) -> None:
        names = ("max_batch", "max_queue", "max_n", "max_side", "max_steps", "max_prompt_chars", "max_body_bytes")
        for name in (*names, "keep_states"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_batch > MAX_BATCH or self.max_n > MAX_BATCH:
            raise ValueError(f"max_batch ({self.max_batch}) and max_n ({self.max_n}) must be <= {MAX_BATCH}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.stall_s <= 0:
            raise ValueError(
                f"need max_wait_ms >= 0, timeout_s > 0, stall_s > 0, got {self.max_wait_ms}, {self.timeout_s}, "
                f"{self.stall_s}"
            )


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a GPU server pads its batches to: powers of two below max_batch, and max_batch."""
    return (*(2**i for i in range(max_batch.bit_length()) if 2**i < max_batch), max_batch)


class OpenAIRequest(BaseModel):
    """The OpenAI fields of POST /v1/images/generations and /edits; ours come from GenerateOptions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    quality: str | None = None  # accepted from OpenAI clients, no effect
    style: str | None = None  # accepted from OpenAI clients, no effect
    user: str | None = None  # accepted from OpenAI clients, no effect
    stream: bool = False  # server-sent events: partial images, then the final ones (nextstep.serve.stream)
    partial_images: int | None = None  # with stream: how many partial images (0-3; default 1)


def api_options(task: str) -> list[str]:
    """The GenerateOptions a request of `task` may set (schema fields marked api, less the OpenAI ones)."""
    return [
        name
        for name, f in FIELDS.items()
        if f.metadata["api"] and f.metadata["task"] in (None, task) and name not in OpenAIRequest.model_fields
    ]


def _request_model(name: str, task: str) -> type[OpenAIRequest]:
    """A request body: the OpenAI fields and, each optional, the API's GenerateOptions. A field left out takes
    the checkpoint's default; `seed` left out draws a random seed, returned in the response."""
    types = {"int": int, "float": float, "str": str}
    fields = {option: (types[FIELDS[option].type.split(" ")[0]] | None, None) for option in api_options(task)}
    return create_model(name, __base__=OpenAIRequest, __doc__=f"POST body of the {task} route", **fields)


GenerationRequest = _request_model("GenerationRequest", "generate")
EditRequest = _request_model("EditRequest", "edit")


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """Pydantic's first error as 'field: problem', and the field name."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return f"unknown field {param!r}", param
    if err["type"] == "missing":
        return f"{param} is required", param
    return f"{param}: {err['msg']} (got {err.get('input')!r})", param


class Server:
    """The state behind the routes: the pipeline, its batcher, the limits and the counters."""

    def __init__(self, pipe: Pipeline, config: ServeConfig):
        self.pipe, self.config = pipe, config
        self.defaults = GenerateOptions(**pipe.defaults)
        self.default_size = config.default_size or self.defaults.size
        down = pipe.down_factor
        if any(s % down or s > config.max_side for s in self.default_size):
            raise ValueError(f"default size {self.default_size} must be multiples of {down} within {config.max_side}")
        self.batcher = Batcher(
            lambda jobs, on_token: run_batch(pipe, jobs, with_partials(pipe, jobs, on_token)),
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
        )
        if pipe.model.embed_tokens.weight.is_cuda:  # a state per batch size: graphs captured once, not per call
            pipe.configure_engine(max_states=config.keep_states, batch_buckets=batch_buckets(config.max_batch))
        self.warmed = False
        self.responses: Counter = Counter()  # (path, status) -> responses
        self.streams = StreamStats()
        self.started = time.time()

    def warm(self) -> None:
        """Compile, tune and capture before the first request: one image at the default size, then the engine's
        states of the default options at every batch bucket (GPU). Blocking; once."""
        if not self.warmed:
            self.pipe.generate("warm-up", size=self.default_size, steps=1, seed=0)
            for batch in self.pipe.engine_options.get("batch_buckets", ()):
                self.pipe.warm(batch, size=self.default_size)
            self.warmed = True

    def check_text(self, text: str, param: str, *, required: bool) -> None:
        if required and not text.strip():
            raise ApiError(f"{param} must be a non-empty string", param=param)
        if len(text) > self.config.max_prompt_chars:
            raise ApiError(f"{param} has {len(text)} characters; the limit is {self.config.max_prompt_chars}", param)
        tokens = len(self.pipe.tokenizer.encode(text))
        if tokens > MAX_PROMPT_TOKENS:
            raise ApiError(f"{param} has {tokens} tokens; the limit is {MAX_PROMPT_TOKENS}", param=param)

    def job(self, req: GenerationRequest, *, size: tuple[int, int] | None = None, image=None) -> Job:
        """Validate a parsed request against the limits and make its batch job."""
        cfg = self.config
        if req.model is not None and req.model != cfg.model_name:
            message = f"model {req.model!r} is not served here; this server serves {cfg.model_name!r}"
            raise ApiError(message, "model", status=404)
        if req.response_format != "b64_json":
            raise ApiError(
                f"response_format {req.response_format!r} is not supported: images come back inline, use 'b64_json'",
                param="response_format",
            )
        if req.output_format != "png":
            raise ApiError(f"output_format {req.output_format!r} is not supported: use 'png'", "output_format")
        if not 1 <= req.n <= cfg.max_n:
            raise ApiError(f"n must be from 1 to {cfg.max_n}, got {req.n}", param="n")
        self.check_text(req.prompt, "prompt", required=True)
        if req.negative_prompt is not None:
            self.check_text(req.negative_prompt, "negative_prompt", required=False)
        if req.steps is not None and not 1 <= req.steps <= cfg.max_steps:
            raise ApiError(f"steps must be from 1 to {cfg.max_steps}, got {req.steps}", param="steps")
        given = {name: getattr(req, name) for name in api_options("edit" if image else "generate")}
        given = {name: value for name, value in given.items() if value is not None}  # None: the default
        options = {name: value for name, value in given.items() if name != "seed"}
        try:
            for name, value in given.items():
                check_value(name, value)
        except OptionError as e:
            raise ApiError(str(e), param=e.name) from None
        size = size or parse_size(
            req.size, default=self.default_size, down=self.pipe.down_factor, max_side=cfg.max_side
        )
        key = BatchKey(
            kind="edit" if image is not None else "generate", options=tuple(sorted({**options, "size": size}.items()))
        )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        deadline = time.monotonic() + cfg.timeout_s
        return Job(key=key, prompt=req.prompt, seed=seed, n=req.n, image=image, deadline=deadline)

    async def answer(self, req: OpenAIRequest, job: Job, request: Request, parent: tuple[Chain, str] | None = None):
        """The route's answer to a valid request: JSON, or with stream=true an event stream; `parent`
        (chain.parent_of of an edit's upload) is the chain an edit continues."""
        if not req.stream:
            if req.partial_images is not None:
                raise ApiError("partial_images is for streaming: send stream=true with it", param="partial_images")
            return await self.serve(job, request, parent)
        partial_images = DEFAULT_PARTIAL_IMAGES if req.partial_images is None else req.partial_images
        return stream_response(self, job, partial_images, request, parent)

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job (429 when the queue is full); its future resolves to its images."""
        try:
            return self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(f"server busy: {e}", status=429, kind="rate_limit_exceeded") from None

    @staticmethod
    def failure(e: BaseException) -> ApiError:
        """A failed generation as the error the client gets."""
        if isinstance(e, ValueError):  # the pipeline's own validation
            return ApiError(str(e))
        log.error("generation failed", exc_info=e)
        return ApiError(f"image generation failed: {type(e).__name__}", status=500)

    async def serve(self, job: Job, request: Request, parent: tuple[Chain, str] | None = None) -> JSONResponse:
        """Queue a job, wait for its images, answer them as OpenAI does, plus the seed used and each image's
        record (its PNG's too); `parent` as in answer().

        A job whose client disconnects or whose deadline passes is cancelled: it leaves the queue, and a
        running batch stops at its next image token once all of its jobs are cancelled."""
        future = self.submit(job)
        try:
            images = await self.wait(job, request)
        except (ApiError, asyncio.CancelledError):
            future.cancel()
            raise
        except Exception as e:
            raise self.failure(e) from None
        data = await asyncio.to_thread(self.items, job, images, parent)
        return JSONResponse({"created": int(time.time()), "data": data, "seed": job.seed})

    def items(self, job: Job, images: list[Image.Image], parent: tuple[Chain, str] | None) -> list[dict]:
        """The response's data: each image as a PNG carrying its record, and the record as `nextstep`."""
        options = {**dict(job.key.options), "seed": job.seed, "n": job.n}
        opts = run_options(self.pipe, job.key.kind, job.image, options)
        model, where = self.config.model_name, platform_of(self.pipe)
        out = []
        for i, image in enumerate(images):
            if parent is None:
                image = generated(image, job.prompt, opts, model=model, index=i, platform=where)
            else:
                image = edited(image, parent, job.prompt, opts, model=model, index=i, platform=where)
            record = image.info[KEY]
            out.append({"b64_json": png_base64(image, record), "nextstep": json.loads(record)})
        return out

    async def wait(self, job: Job, request: Request) -> list[Image.Image]:
        """The job's images; cancels it (ApiError 504 or 499) at its deadline or when its client has gone."""
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                job.future.cancel()
                raise ApiError(f"request timed out after {self.config.timeout_s:g} s", status=504, kind="timeout")
            done, _ = await asyncio.wait({job.future}, timeout=min(left, DISCONNECT_POLL_S))
            if done:
                return job.future.result()
            if await request.is_disconnected():
                job.future.cancel()
                raise ApiError("client closed the request", status=499, kind="client_closed")

    def metrics(self) -> dict:
        stats = self.batcher.stats
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "queued": self.batcher.queued,
            "responses": [{"path": p, "status": s, "count": c} for (p, s), c in sorted(self.responses.items())],
            "requests": stats.requests,
            "images": stats.images,
            "failed": stats.failed,
            "rejected": stats.rejected,
            "cancelled": stats.cancelled,
            "batches": stats.batches,
            "batch_images": {str(k): v for k, v in sorted(stats.batch_images.items())},
            "batch_requests": {str(k): v for k, v in sorted(stats.batch_requests.items())},
            "streams": asdict(self.streams),
            "config": {**asdict(self.config), "default_size": list(self.default_size)},
        }


def png_base64(image: Image.Image, record: str | None = None) -> str:
    """The image as base64 PNG, carrying its record (chain.KEY) when it has one (a partial image has none)."""
    return base64.b64encode(encode_png(image, None if record is None else {KEY: record})).decode("ascii")


def build_app(pipe: Pipeline, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the batcher."""
    server = Server(pipe, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if pipe.model.embed_tokens.weight.is_cuda:  # requests come once this returns: warm up first
            await asyncio.to_thread(server.warm)
        server.batcher.start()
        yield
        await server.batcher.stop()

    # no /docs or /redoc: their pages load scripts from a CDN; /openapi.json stays
    app = FastAPI(title="nextstep", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    paths: set[str] = set()  # the routes, filled in below: /metrics counts any other path as "other"
    app.add_middleware(BodyLimit, max_bytes=server.config.max_body_bytes)
    app.add_middleware(CountResponses, counts=server.responses, paths=paths)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        stalled = server.batcher.stalled_s
        if not server.batcher.alive:
            status = "batcher stopped"
        elif stalled > server.config.stall_s:
            status = f"stalled: the running batch has made no progress for {stalled:.0f} s"
        else:
            status = "ok"
        body = {"status": status, "model": server.config.model_name, "queued": server.batcher.queued}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": server.config.model_name,
            "object": "model",
            "created": int(server.started),
            "owned_by": "nextstep",
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> dict:
        return server.metrics()

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(f"request body must be a JSON object, got {type(body).__name__}")
        try:
            req = GenerationRequest.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e)
            raise ApiError(message, param=param) from None
        return await server.answer(req, server.job(req), request)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError("edits take multipart/form-data: an `image` file and a `prompt` field, like OpenAI's")
        try:
            form = await request.form(max_files=2, max_fields=32)
        except Exception as e:  # starlette raises several kinds on a malformed body
            raise ApiError(f"cannot parse the multipart form: {e}") from None
        uploads = form.getlist("image") + form.getlist("image[]")
        if len(uploads) != 1 or isinstance(uploads[0], str):
            raise ApiError(f"send exactly one image file as `image`, got {len(uploads)}", param="image")
        if "mask" in form:
            raise ApiError("mask is not supported: the instruction edits the whole image", param="mask")
        fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]")}
        try:
            req = EditRequest.model_validate(fields)
        except ValidationError as e:
            message, param = validation_message(e)
            raise ApiError(message, param=param) from None
        down, max_side = pipe.down_factor, server.config.max_side
        data = await uploads[0].read()
        image = await asyncio.to_thread(read_image, data, max_pixels=server.config.max_upload_pixels, down=down)
        size = parse_size(
            req.size, default=fit_size(*image.size, down=down, max_side=max_side), down=down, max_side=max_side
        )
        parent = await asyncio.to_thread(parent_of, image)  # of the upload as sent: a replay resizes it as below
        if image.size != (size[1], size[0]):  # as the pipeline would; here it bounds what a queued job holds
            image = await asyncio.to_thread(image.resize, (size[1], size[0]), Image.BICUBIC)
        return await server.answer(req, server.job(req, size=size, image=image), request, parent)

    paths.update(route.path for route in app.routes)
    return app


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = ArgumentParser(prog="nextstep serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--model-name", default=None, help="model id for /v1/models (default: the checkpoint folder name)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most images per pipeline call (1 = off)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a request waits for company")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before answering 429")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request before answering 504")
    p.add_argument("--max-n", type=int, default=d.max_n, help="most images per request")
    p.add_argument("--max-side", type=int, default=d.max_side, help="largest image side in px")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="largest steps a request may ask for")
    p.add_argument("--default-size", type=size_arg, default=None, help="WIDTHxHEIGHT when a request names none")
    p.add_argument("--stall", type=float, default=d.stall_s, help="seconds without progress before /health is 503")
    p.add_argument("--keep-states", type=int, default=d.keep_states, help="GPU decoding states kept (batch sizes)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def serve_config(args: argparse.Namespace, **fields) -> ServeConfig:
    """The ServeConfig of build_parser()'s options (the single server's and each Ray replica's)."""
    return ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_n=args.max_n,
        max_side=args.max_side,
        max_steps=args.max_steps,
        default_size=args.default_size,
        stall_s=args.stall,
        keep_states=args.keep_states,
        **fields,
    )


def main_serve(argv: list[str] | None = None) -> int:
    import uvicorn

    from nextstep.hub import model_name, resolve_model_dir

    if {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)} & {"--replicas", "--address"}:
        from nextstep.serve.ray_serve import main_serve_ray  # replicas on Ray Serve

        return main_serve_ray(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = resolve_model_dir(args.model)
    config = serve_config(args, model_name=args.model_name or model_name(args.model))
    app = build_app(Pipeline.from_pretrained(path, device=args.device), config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main_serve())
