"""The image API on Ray Serve: model replicas across GPUs and nodes behind a gateway that keeps the API's contract.

nextstep serve --replicas 2 --gpus-per-replica 1                    # a local Ray cluster on this machine
nextstep serve --replicas 2 --max-replicas 8 --address ray://head:10001
serve run configs/serve_ray.yaml                                    # the same application from a config file

Each replica (ImageModel) loads the pipeline, warms it up, then serves the single-process server's own app
(nextstep.serve.api.build_app) in process, batches included: Ray Serve's @serve.batch forms the next batch while
the current one runs, so under load a replica ran batches of 1-3 images instead of max_batch (BENCHMARKS.md).
The gateway, the HTTP ingress, forwards each request to a replica through a streaming deployment handle
(nextstep.serve.relay: a whole reply, or a stream=true response event by event) and turns Ray's failures into
the API's JSON errors: a replica that dies mid-request gives 503, a hung one 504; once a stream has started,
the same errors end it as an `error` event. A client that goes away cancels the call on the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

try:
    from ray import serve
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import DeploymentUnavailableError
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
except ImportError as e:
    raise ImportError(f"replicas on Ray Serve need ray[serve]: pip install 'nextstep[ray]' ({e})") from e

from nextstep.sampling.pipeline import Pipeline
from nextstep.serve.api import ApiError, BodyLimit, ServeConfig, build_app, build_parser, serve_config
from nextstep.serve.relay import HttpCall, HttpReply, call_app
from nextstep.serve.stream import error_event

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-nextstep-replica"  # names the replica (its Ray actor, namespace "serve") that answered
APP_NAME = "nextstep"  # the Ray Serve application


@dataclass
class RayConfig:
    model: str | None = None  # checkpoint directory, present on every node; None: the built-in model
    device: str | None = None  # cpu or cuda; None: cuda when the replica has a GPU
    replicas: int = 1  # replicas at start; with max_replicas, the autoscaling floor
    max_replicas: int | None = None  # autoscaling ceiling; None: a fixed number of replicas
    target_ongoing_requests: float = 16  # autoscaling aims at this many requests in flight per replica
    gpus_per_replica: float = 0  # GPUs per replica (0: CPU replicas; 0.5: two replicas share a GPU)
    cpus_per_replica: float = 1  # CPU cores per replica (the torch threads of a CPU replica)
    health_check_period_s: float = 10  # Ray calls each replica's check_health this often
    serve: ServeConfig = field(default_factory=ServeConfig)  # limits, batching and timeouts of each replica

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0 or self.target_ongoing_requests <= 0:
            raise ValueError(
                f"need gpus_per_replica >= 0, cpus_per_replica >= 0 and target_ongoing_requests > 0, got "
                f"{self.gpus_per_replica}, {self.cpus_per_replica}, {self.target_ongoing_requests}"
            )
        if self.gpus_per_replica > 1 and not float(self.gpus_per_replica).is_integer():
            # Ray shares a GPU between actors, never one actor across a fraction of a second GPU
            raise ValueError(f"gpus_per_replica above 1 must be a whole number, got {self.gpus_per_replica}")

    @classmethod
    def from_dict(cls, args: dict) -> RayConfig:
        """The `args` of a `serve run` config file: RayConfig's fields, ServeConfig's under `serve`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        serve_args = dict(args.get("serve") or {})
        if "default_size" in serve_args:
            serve_args["default_size"] = tuple(serve_args["default_size"])
        return cls(**{**args, "serve": ServeConfig(**serve_args)})


@serve.deployment(name="ImageModel")
class ImageModel:
    """One model replica: the pipeline, warmed up before Ray routes to it, serving the API app in process."""

    async def __init__(self, config: RayConfig, model_dir: str):
        device = config.device or ("cuda" if config.gpus_per_replica > 0 else "cpu")
        self.pipe = await asyncio.to_thread(Pipeline.from_pretrained, model_dir, device=device)
        self.app = build_app(self.pipe, config.serve)
        # Ray marks the replica ready when this constructor returns: warm up first, so the first request
        # does not pay for lazy initialisation (and on GPU the engine's CUDA-graph captures)
        await asyncio.to_thread(self.app.state.server.warm)
        self.lifespan = contextlib.AsyncExitStack()
        await self.lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self.name = serve.get_replica_context().replica_id.to_full_id_str()
        log.info("replica %s ready on %s", self.name, device)

    async def respond(self, call: HttpCall) -> AsyncIterator[HttpReply | bytes]:
        """The app's answer to `call` (relay.call_app): one HttpReply, or a stream's reply and then its chunks.
        The gateway cancelling the call (its client went away) is the client disconnecting."""
        async for piece in call_app(self.app, call, replica=self.name):
            yield piece

    def check_health(self) -> None:
        """Ray replaces a replica whose check fails."""
        if not self.app.state.server.batcher.alive:
            raise RuntimeError("the batcher stopped")

    async def __del__(self) -> None:
        await self.lifespan.aclose()


async def next_piece(replies: DeploymentResponseGenerator, start: float, limit_s: float):
    """The replica's next reply or chunk (StopAsyncIteration after the last), `limit_s` after `start` at the
    latest (time.monotonic); Ray's failures as ApiError."""
    try:
        return await asyncio.wait_for(replies.__anext__(), start + limit_s - time.monotonic())
    except asyncio.TimeoutError:
        replies.cancel()
        raise ApiError(f"no replica answered in {limit_s:g} s", status=504, kind="timeout") from None
    except RayActorError as e:
        log.warning("replica died serving a request: %s", e)
        message = "the replica serving this request died; it is being replaced, retry the request"
        raise ApiError(message, status=503) from None
    except DeploymentUnavailableError as e:
        raise ApiError(f"no replica is available: {e.message}", status=503) from None
    except RayTaskError as e:  # the app answers its own failures as JSON 500s; this is the relay failing
        log.error("replica failed serving a request: %s", e)
        raise ApiError(f"the replica failed: {type(e.cause).__name__}", status=500) from None


def gateway_app(model: DeploymentHandle, config: ServeConfig) -> FastAPI:
    """Every route of the API, forwarded to a replica; Ray's failures answered as the API's JSON errors, or
    once a stream has started as its `error` event."""
    app = FastAPI(title="nextstep", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    deadline_s = config.timeout_s + 30  # replicas answer 504 at timeout_s; this bounds a hung replica
    streaming = model.options(stream=True)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        replies = streaming.respond.remote(HttpCall(request.method, path, headers, await request.body()))
        start = time.monotonic()
        try:
            reply = await next_piece(replies, start, deadline_s)
        except ApiError as e:
            return e.response()
        headers = {REPLICA_HEADER: reply.replica}
        if not reply.stream:
            return Response(reply.body, reply.status, headers, media_type=reply.content_type)

        async def chunks() -> AsyncIterator[bytes | str]:
            try:
                while True:
                    yield await next_piece(replies, start, deadline_s)
            except StopAsyncIteration:
                return
            except ApiError as e:
                yield error_event(e)
            finally:
                replies.cancel()  # no-op once the stream ended; else the client went away: the replica stops

        headers["cache-control"] = "no-cache"
        return StreamingResponse(chunks(), reply.status, headers, media_type=reply.content_type)

    return app


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Gateway:
    """The HTTP ingress: holds no model, so it survives the replicas behind it."""

    def __init__(self, model: DeploymentHandle, config: ServeConfig):
        self.model, self.config = model, config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return gateway_app(self.model, self.config)


def build_application(config: RayConfig) -> serve.Application:
    """The gateway bound to the model deployment, with replicas, resources and autoscaling from `config`."""
    from nextstep.hub import model_name, resolve_model_dir

    model_dir = resolve_model_dir(config.model).resolve()
    serve_cfg = config.serve
    if serve_cfg.model_name == ServeConfig.model_name:
        serve_cfg = replace(serve_cfg, model_name=model_name(config.model))
    config = replace(config, serve=serve_cfg)
    # a replica takes requests up to its own queue limit and answers 429 beyond it, as the single server does
    per_replica = serve_cfg.max_queue + serve_cfg.max_batch
    scaling = {"num_replicas": config.replicas}
    if config.max_replicas is not None:
        bounds = {"min_replicas": config.replicas, "max_replicas": config.max_replicas}
        scaling = {"autoscaling_config": {**bounds, "target_ongoing_requests": config.target_ongoing_requests}}
    model = ImageModel.options(
        **scaling,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        max_ongoing_requests=per_replica,
        health_check_period_s=config.health_check_period_s,
    ).bind(config, str(model_dir))
    max_replicas = config.max_replicas or config.replicas
    return Gateway.options(max_ongoing_requests=per_replica * max_replicas).bind(model, serve_cfg)


def app_builder(args: dict) -> serve.Application:
    """The application of `serve run configs/serve_ray.yaml`: `args` as in RayConfig.from_dict."""
    return build_application(RayConfig.from_dict(args))


def build_ray_parser() -> argparse.ArgumentParser:
    p = build_parser()
    g = p.add_argument_group("replicas on Ray Serve")
    g.add_argument("--replicas", type=int, default=1, help="model replicas (the autoscaling floor with --max-replicas)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=RayConfig.target_ongoing_requests)
    g.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs per replica; a fraction shares one (0.5: two replicas a GPU). Default: 1 if the cluster has GPUs",
    )
    g.add_argument("--cpus-per-replica", type=float, default=RayConfig.cpus_per_replica)
    g.add_argument("--address", default=None, help="Ray cluster (ray://head:10001, auto); default: start one here")
    return p


def main_serve_ray(argv: list[str] | None = None) -> int:
    """`nextstep serve --replicas N ...`: run the application on Ray until interrupted."""
    import ray

    args = build_ray_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve_cfg = serve_config(args, **({"model_name": args.model_name} if args.model_name else {}))
        config = RayConfig(
            model=args.model,
            device=args.device,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            gpus_per_replica=args.gpus_per_replica or 0,
            cpus_per_replica=args.cpus_per_replica,
            serve=serve_cfg,
        )
    except ValueError as e:
        print(f"nextstep serve: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the shutdown below on `kill` too
    ray.init(address=args.address, logging_level=args.log_level.upper())
    try:
        if args.gpus_per_replica is None and args.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0:
            config = replace(config, gpus_per_replica=1)
        application = build_application(config)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name=APP_NAME, route_prefix="/", logging_config={"log_level": args.log_level.upper()})
        log.info("serving on http://%s:%d with %s", args.host, args.port, config)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()
    except (ValueError, FileNotFoundError) as e:
        print(f"nextstep serve: error: {e}", file=sys.stderr)
        return 2
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main_serve_ray())
