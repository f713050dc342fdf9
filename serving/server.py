"""The serving process: builds the parts, gives each its dependencies, listens, serves health
and reflection, runs the background tasks and stops gracefully.

The parts, one concern each (in the manner of vLLM's `entrypoints/`, handlers given what they
use rather than an app object):
- serving/engine.py: the vLLM engine; serving/hot_swap.py keeps it on the live version;
- serving/completion_service.py, feedback_service.py, model_service.py: one servicer per proto
  service (completions through `Completions`, the core both transports share);
- serving/openai/: the OpenAI-compatible HTTP API (with `http_port`), uvicorn in this loop;
- serving/convert.py: request validation and protobuf <-> records;
- serving/errors.py: exceptions -> gRPC statuses around every handler, with serving/auth.py's
  key check;
- serving/replica.py: what this replica serves, and its reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from instructloop.errors import ConfigError
from instructloop.feedback.config import StoreConfig
from instructloop.feedback.keys import Keys
from instructloop.feedback.store import FeedbackStore
from instructloop.model_init import is_model_dir
from instructloop.paths import checkpoint_roots, default_model_dir
from instructloop.registry import AsyncModelRegistry, ModelVersion, RegistryError
from instructloop.serving import (
    completion_service,
    feedback_service,
    labeling_service,
    model_service,
)
from instructloop.serving.auth import Authenticator
from instructloop.serving.completion_service import Completions, CompletionService
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine import Engine
from instructloop.serving.errors import RpcGuard
from instructloop.serving.fallback import start_loadable
from instructloop.serving.feedback_service import FeedbackService
from instructloop.serving.hot_swap import HotSwapper
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.model_service import ModelService
from instructloop.serving.openai.listener import HttpListener
from instructloop.serving.quotas import QuotaLimits, Quotas
from instructloop.serving.replica import (
    ServedModel,
    follow_shared_engine,
    report_replica,
    watch_engine_stats,
    watch_live,
)
from instructloop.v1 import (
    completion_pb2_grpc,
    feedback_pb2_grpc,
    labeling_pb2_grpc,
    model_pb2_grpc,
)

log = logging.getLogger("instructloop.serving")
_STOP_STEP_S = 5.0
"""How long stop() waits for each background task set and Redis client to finish."""

SERVICES = (
    completion_service.SERVICE_NAME,
    feedback_service.SERVICE_NAME,
    model_service.SERVICE_NAME,
    labeling_service.SERVICE_NAME,
)


def resolve_model_path(model: str) -> Path:
    """A local model directory as is; a hub id downloaded (or found in the cache) first."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.is_absolute() or model.startswith((".", "~")):
        raise ConfigError(f"model directory {model} does not exist")
    from huggingface_hub import snapshot_download  # heavy; only for a hub id

    try:
        return Path(snapshot_download(model))
    except Exception as e:
        raise ConfigError(f"cannot find model {model!r} locally or on the hub: {e}") from e


def _hub_cache() -> Path:
    from huggingface_hub import constants  # heavy; only for a hub id

    return Path(constants.HF_HUB_CACHE)


def open_store(config: ServerConfig) -> FeedbackStore:
    """The feedback store, with the server's overrides of its limits."""
    store_cfg = StoreConfig(key_prefix=config.key_prefix)
    if config.feedback_rate_limit_per_minute is not None:
        store_cfg.rate_limit_per_minute = config.feedback_rate_limit_per_minute
    store_cfg.principal_rate_limit_per_minute = config.quota_feedback_per_minute
    if config.completion_ttl_s is not None:
        store_cfg.completion_ttl_s = config.completion_ttl_s
    try:
        return FeedbackStore.from_url(config.redis_url, store_cfg)
    except ValueError as e:  # a URL the store cannot use (e.g. TLS settings that do not work)
        raise ConfigError(f"--redis-url {config.redis_url}: {e}") from e


class InstructloopServer:
    """The whole serving process: engine, store, registry, gRPC server, metrics.

    `engine`: pass an already started Engine to share it (tests run several servers on one
    engine); it is then not shut down by `stop()`.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine: Engine | None = None,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> None:
        config.validate()
        self.config = config
        self.progress = progress
        self.metrics = ServerMetrics()
        users, admins = config.key_principals()
        self.auth = Authenticator(users, admins, config.labeller_principals())
        self.store = open_store(config)
        self.quotas = Quotas(
            self.store.client,
            Keys(config.key_prefix),
            QuotaLimits(config.quota_completions_per_minute, config.quota_tokens_per_minute),
            self.metrics,
        )
        self.registry = AsyncModelRegistry(config.redis_url, prefix=config.key_prefix)
        self._own_engine = engine is None
        self.engine: Engine = engine  # type: ignore[assignment]  # set in start()
        self.served = ServedModel(self.metrics, config.replica_id)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._http: HttpListener | None = None
        self.completions: Completions | None = None  # the core both transports share
        self.feedback: FeedbackService | None = None
        self.labeling: labeling_service.Labeling | None = None  # gRPC's and the /label page's
        self._tasks: list[asyncio.Task[None]] = []
        self.swapper: HotSwapper | None = None
        self._stopped = False
        self.port = 0
        self.http_port = 0
        """The HTTP API's port once started (0: none)."""

    @property
    def address(self) -> str:
        return f"{self.config.grpc_host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The HTTP API's base URL (`http://host:port`), None without one."""
        return self._http.url if self._http is not None else None

    @property
    def model(self) -> ModelVersion:
        """The version this replica serves (after `start`)."""
        return self.served.model

    @property
    def serving_since(self) -> float:
        return self.served.since

    # --- start -----------------------------------------------------------------------------

    async def start(self) -> InstructloopServer:
        cfg = self.config
        if not self.auth.enabled:
            log.warning(
                "AUTHENTICATION IS OFF: no API keys configured (INSTRUCTLOOP_API_KEYS / "
                "INSTRUCTLOOP_ADMIN_KEYS / --api-keys-file); anyone who reaches %s:%s can call "
                "every RPC, ModelService included",
                cfg.grpc_host,
                cfg.grpc_port,
            )
        else:
            self.progress(f"principals: {', '.join(sorted(self.auth.principals))}")
        self.progress(f"registry: {cfg.redis_url} (prefix {cfg.key_prefix!r})")
        self.served.set(await self._start_engine(), time.time())
        self.metrics.engine_up.set(1)
        self._server = await self._listen()
        if cfg.http_port is not None:
            await self._listen_http()
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        await self._set_serving(True)
        self._start_tasks()
        self.progress(
            f"serving {self.model.version} ({self.model.path}) on {self.address}"
            + (f", OpenAI API on {self.http_url}/v1" if self.http_url else "")
            + (f", labelling page {self.http_url}/label" if self.http_url else "")
            + (f", metrics on :{self.metrics.port}/metrics" if self.metrics.port else "")
        )
        return self

    async def _start_engine(self) -> ModelVersion:
        """Start our own engine on the version to serve, or (a shared engine) make sure the
        registry knows what it serves. Returns that version."""
        self.served.set_pinned(not self.config.follows_live)
        if self.engine is None:
            try:
                mv = await self._resolve_model()
                if self.config.model is not None:  # named by the operator: that one or none
                    self.engine = Engine(mv.path, self.config, model_version=mv.version)
                    await self.engine.start(self.progress)
                    return mv
                # The live version, or the newest that loads if it will not (serving/fallback.py)
                started = await start_loadable(self.registry, self.config, mv, self.progress)
            except RegistryError as e:
                raise ConfigError(f"model registry: {e}") from e
            self.engine = started.engine
            self.served.set_fallback(started.fallback)
            return started.model
        # A shared engine: it serves what it serves.
        if not self.engine.model_version:
            raise ConfigError("a shared engine must carry its model_version")
        try:
            return await self.registry.get(self.engine.model_version)
        except RegistryError:
            mv = await self.registry.register(
                self.engine.model, source="register", roots=[*checkpoint_roots(), self.engine.model]
            )
            if await self.registry.live() is None:
                await self.registry.promote(mv.version)
            return mv

    async def _resolve_model(self) -> ModelVersion:
        """Which checkpoint to serve, registered (and made live if nothing is)."""
        cfg = self.config
        if cfg.model is None:
            live = await self.registry.live()
            if live is not None:
                return live
            path = default_model_dir()
            if not is_model_dir(path):
                raise ConfigError(
                    f"no model to serve: the registry has no live version and {path} does not "
                    "exist; run `instructloop model init` or pass --model"
                )
            source = "init"
        else:
            path = await asyncio.to_thread(resolve_model_path, cfg.model)
            source = "register"
        # A directory the operator names with --model is a checkpoint root of its own (a hub
        # download: the hub cache, whose snapshots link into its blobs); it is verified as any.
        roots = [*checkpoint_roots()]
        if cfg.model is not None:
            roots.append(path if Path(cfg.model).expanduser().is_dir() else _hub_cache())
        mv = await self.registry.register(path, source=source, roots=roots)
        if await self.registry.live() is None:
            await self.registry.promote(mv.version)
        return mv

    async def _listen(self) -> grpc.aio.Server:
        """A started grpc.aio server with every service on the configured address."""
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._add_services(server)
        target = f"{cfg.grpc_host}:{cfg.grpc_port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
            )
            self.port = server.add_secure_port(target, creds)
        else:
            self.port = server.add_insecure_port(target)
        if not self.port:
            raise ConfigError(f"cannot listen on {target}")
        await server.start()
        return server

    def _add_services(self, server: grpc.aio.Server) -> None:
        """The three services, each guarded and given its dependencies; health; reflection."""
        cfg, guard = self.config, RpcGuard(self.auth, self.metrics, self.quotas)
        self.completions = Completions(self.engine, self.store, cfg, self.metrics)
        completion = CompletionService(self.completions)
        feedback = self.feedback = FeedbackService(self.store, self.metrics)
        models = ModelService(self.registry, self.engine, self.served, cfg.replica_id)
        guard.register(
            completion_pb2_grpc.add_CompletionServiceServicer_to_server,
            completion,
            server,
            completions=True,
        )
        guard.register(feedback_pb2_grpc.add_FeedbackServiceServicer_to_server, feedback, server)
        guard.register(model_pb2_grpc.add_ModelServiceServicer_to_server, models, server)
        self.labeling = labeling_service.build(self.store, cfg, self.metrics)
        guard.register(
            labeling_pb2_grpc.add_LabelingServiceServicer_to_server,
            labeling_service.LabelingService(self.labeling),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def _listen_http(self) -> None:
        """The OpenAI-compatible HTTP API (serving/openai/) in this loop, on the same core and
        servicers as gRPC; TLS with gRPC's certificate when it has one."""
        from instructloop.serving import labeling_http
        from instructloop.serving.openai.app import build_app
        from instructloop.serving.openai.parts import ApiParts

        cfg = self.config
        assert self.completions is not None and self.feedback is not None
        assert cfg.http_port is not None
        app = build_app(
            ApiParts(
                self.completions, self.feedback, self.auth, self.metrics, self.served,
                self.engine, cfg, quotas=self.quotas,
            )
        )  # fmt: skip
        app.include_router(labeling_http.router(labeling_http.parts_of(self)))  # /label, /status
        self._http = HttpListener(
            app, cfg.http_host, cfg.http_port, access_log=cfg.http_access_log,
            tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
        )  # fmt: skip
        try:
            self.http_port = await self._http.start()
        except OSError as e:
            self._http = None
            raise ConfigError(f"cannot listen on {cfg.http_host}:{cfg.http_port}: {e}") from e

    def _start_tasks(self) -> None:
        """Engine metrics, the replica report, the live-version watch, engine supervision (or,
        on a shared engine, its health mirrored) and, for a replica that follows the live
        version, the hot swapper."""

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            self._tasks.append(asyncio.create_task(coro))

        spawn(watch_engine_stats(self.engine, self.metrics))
        spawn(report_replica(self.registry, self.config.replica_id, self._replica_info))
        # Live versus served: a pinned replica's divergence metric, a fallback's end.
        spawn(watch_live(self.registry, self.served, lambda: self.config.swap_poll_s))
        if self._own_engine:
            spawn(self.engine.supervise(self._on_engine_state, progress=self.progress))
        else:
            spawn(follow_shared_engine(self.engine, self.metrics, self._set_serving))
        if self.config.follows_live:
            # The config is read on every swap, so a changed one applies to the next.
            self.swapper = HotSwapper(
                self.engine, self.registry, self.metrics, self.served, lambda: self.config
            )
            spawn(self.swapper.run())

    # --- while serving ---------------------------------------------------------------------

    def _replica_info(self) -> dict[str, Any]:
        """What `instructloop status` shows of this replica."""
        return {
            "version": self.model.version,
            "address": self.address,
            "pid": os.getpid(),
            "follows_live": self.config.follows_live,
            "serving_since": self.serving_since,
            "engine_up": self.engine.alive,
            "swap_error": self.swapper.last_error if self.swapper else None,
            "pinned": self.served.pinned,
            "fallback": self.served.fallback.reason if self.served.fallback else None,
        }

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    def _on_engine_state(self, up: bool) -> None:
        self.metrics.engine_up.set(1 if up else 0)
        if up:
            self.metrics.engine_restarts.inc()
            self.served.since = time.time()
        asyncio.get_running_loop().create_task(self._set_serving(up))

    # --- stop ------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, in-flight RPCs get `grace` seconds, then close all."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        # The supervisor goes first: an engine that dies while we stop (Ctrl-C in a terminal
        # reaches the engine process too) must not be restarted. The swapper stops swapping
        # before its task is cancelled.
        if self.swapper is not None:
            self.swapper.stop()
        await self._cancel_tasks()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self.health.enter_graceful_shutdown()
        # Both transports drain together, each giving its requests in flight `grace` seconds.
        await asyncio.gather(self._stop_grpc(grace), self._stop_http(grace))
        self.metrics.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.registry.remove_replica(self.config.replica_id), 2.0)
        if self._own_engine and self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        with contextlib.suppress(Exception):
            await self.quotas.settle(_STOP_STEP_S)
        for close in (self.store.close, self.registry.close):
            try:
                await asyncio.wait_for(close(), _STOP_STEP_S)
            except Exception as e:  # a dead Redis: acks were written before they were sent
                log.warning("closing a Redis client on stop failed: %s", e)

    async def _stop_grpc(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _stop_http(self, grace: float) -> None:
        if self._http is not None:
            await self._http.stop(grace)
            self._http = None

    async def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # Bounded: a task stuck in a client library (redis-py reconnecting to a Redis that
            # went away) must not keep the server from stopping.
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_STEP_S)
            for t in pending:
                log.warning("stop: background task %s did not finish; left behind", t.get_name())
        self._tasks.clear()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
