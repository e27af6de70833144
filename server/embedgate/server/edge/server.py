"""The gRPC server's lifecycle: listeners, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from embedgate.server import tracing
from embedgate.server.config import ConfigError, ServerConfig, TlsConfig, TracingConfig
from embedgate.server.edge.access import SERVICE_NAME
from embedgate.server.edge.callers import Callers
from embedgate.server.edge.connect_api import ConnectDoor
from embedgate.server.edge.doors import Gate
from embedgate.server.edge.guard import Guard, Tokens
from embedgate.server.edge.http_server import HttpServer
from embedgate.server.edge.openai_api import OpenAIDoor
from embedgate.server.edge.rerank_api import RerankDoor
from embedgate.server.edge.service import EmbeddingService
from embedgate.server.health import Health
from embedgate.server.metrics import Metrics
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Gateway:
    """One gRPC server in front of one router.

    ``start`` loads the models, then listens; health says SERVING only once both are
    done. ``stop`` turns health NOT_SERVING at once, refuses new RPCs, lets in-flight
    ones finish within the grace period, then closes the models.

    Listeners: TCP (TLS or mutual TLS when configured), a Unix domain socket, a
    plaintext health-only port for probes, and Prometheus metrics over HTTP. Health
    is kept for the whole server (""), the service, and each model by its name: a
    model whose vendor refuses the key or keeps failing is NOT_SERVING until a call
    to it succeeds again.
    """

    def __init__(
        self,
        router: Router,
        settings: ServerConfig,
        *,
        metrics: Metrics | None = None,
        tokens: Tokens | None = None,
        models_health: Health | None = None,
        callers: Callers | None = None,
        tracing_settings: TracingConfig | None = None,
    ) -> None:
        self._router = router
        self._tracing_settings = tracing_settings or TracingConfig()
        self._traced = False
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._tokens = tokens
        self._callers = callers or Callers(self._metrics)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._http_server: HttpServer | None = None
        self.http_port: int | None = None
        self._health_updates: set[asyncio.Task[None]] = set()
        self._serving = False
        self._uds_bound = False
        self.port = 0
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._models_health = models_health or Health()
        self._models_health.on_change(self._metrics.model_health_changed)
        self._models_health.on_change(self._model_health_changed)

    @property
    def health(self) -> health.aio.HealthServicer:
        return self._health

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def _model_health_changed(self, model: str, serving: bool) -> None:
        if not self._serving:
            return
        status = SERVING if serving else NOT_SERVING
        log.warning(
            "model_health_changed",
            model=model,
            status=health_pb2.HealthCheckResponse.ServingStatus.Name(status),
        )
        task = asyncio.get_running_loop().create_task(self._health.set(model, status))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    def _options(self) -> list[tuple[str, int]]:
        return [
            # gRPC sets SO_REUSEPORT by default: a second server on a busy port would
            # start quietly and take half of the first one's connections.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", self._settings.max_request_bytes),
            ("grpc.max_send_message_length", self._settings.max_response_bytes),
            # Keepalive pings from clients are allowed.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]

    async def start(self) -> int:
        settings = self._settings
        try:
            self._traced = tracing.start(self._tracing_settings)
        except ValueError as problem:
            raise ConfigError(f"tracing: {problem}") from None
        for service in ("", SERVICE_NAME):
            await self._health.set(service, NOT_SERVING)
        server = grpc.aio.server(options=self._options())
        guard = Guard(
            self._metrics, max_concurrent=settings.max_concurrent_rpcs, tokens=self._tokens
        )
        self._router.watch_calls(lambda: guard.unary_active)
        embedding = EmbeddingService(
            self._router,
            default_deadline_s=settings.default_deadline_s,
            pipeline_max_in_flight=settings.pipeline_max_in_flight,
            metrics=self._metrics,
            callers=self._callers,
        )
        guard.register(pb_grpc.add_EmbeddingServiceServicer_to_server, embedding, server)
        guard.register(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(
                (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
            ),
            server,
        )
        guard.register_lenient(health_pb2_grpc.add_HealthServicer_to_server, self._health, server)
        address = _address(settings.host, settings.port)
        credentials = server_credentials(settings.tls) if settings.tls is not None else None
        self.port = _listen(server, address, "gRPC", credentials)
        if settings.uds_path is not None:
            _clear_stale_socket(settings.uds_path)
            _listen(server, f"unix:{settings.uds_path}", "gRPC")
            self._uds_bound = True
        if settings.health_port is not None:
            self._health_server = grpc.aio.server(options=self._options())
            guard.register_lenient(
                health_pb2_grpc.add_HealthServicer_to_server, self._health, self._health_server
            )
            self.health_port = _listen(
                self._health_server,
                _address(settings.health_host or settings.host, settings.health_port),
                "health",
            )
            await self._health_server.start()
        if settings.http_port is not None:
            self._http_server = HttpServer(
                http_app(embedding, guard, self._metrics, settings, self._callers.header),
                settings.http_host or settings.host,
                settings.http_port,
                settings.tls,
                settings.shutdown_grace_s,
            )
            self.http_port = self._http_server.bind()
        if settings.metrics_port is not None:
            host = settings.metrics_host or settings.host
            self._metrics_server = MetricsServer(self._metrics, host, settings.metrics_port)
            try:
                self.metrics_port = await self._metrics_server.start()
            except OSError as error:
                raise ListenError(
                    f"cannot listen for metrics on {_address(host, settings.metrics_port)}: "
                    f"{error.strerror or error}"
                ) from None
        await self._router.start()
        models = [info.name for info in self._router.models()]
        self._metrics.serve_models(models)
        await server.start()
        self._server = server
        if self._http_server is not None:
            self._http_server.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, SERVING)
        for model in models:
            serving = self._models_health.serving(model)
            self._metrics.model_health_changed(model, serving)  # each series from the start
            await self._health.set(model, SERVING if serving else NOT_SERVING)
        self._serving = True
        log.info(
            "server_started",
            host=settings.host,
            port=self.port,
            tls="mutual" if settings.tls and settings.tls.client_ca_file else bool(settings.tls),
            uds=settings.uds_path,
            health_port=self.health_port,
            metrics_port=self.metrics_port,
            http_port=self.http_port,
            auth=self._tokens is not None,
            tracing=self._traced,
            models=models,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        grace = self._settings.shutdown_grace_s if grace is None else grace
        self._serving = False
        # Health first, so load balancers and probes stop sending new work at once.
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            log.info("server_draining", grace_s=grace)
            await asyncio.gather(
                self._server.stop(grace),
                *([self._http_server.stop(grace)] if self._http_server is not None else []),
            )
            self._http_server = None
        if self._http_server is not None:  # bound by a start that failed later
            await self._http_server.stop(0)
            self._http_server = None
        await self._router.close()
        if self._traced:  # the spans still buffered go out
            self._traced = False
            await asyncio.to_thread(tracing.stop)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._uds_bound and self._settings.uds_path is not None:
            with contextlib.suppress(FileNotFoundError):  # ours, and nothing listens on it now
                os.unlink(self._settings.uds_path)
            self._uds_bound = False
        log.info("server_stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def http_app(
    service: EmbeddingService,
    guard: Guard,
    metrics: Metrics,
    settings: ServerConfig,
    caller_header: str,
) -> Starlette:
    """The HTTP doors' routes (Starlette: routing and CORS, nothing of its own between a
    request and the service)."""
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                # What the OpenAI and rerank doors read, and what Connect's and gRPC-Web's
                # browser clients send and read.
                allow_headers=[
                    "authorization",
                    "content-type",
                    "x-request-id",
                    "connect-protocol-version",
                    "connect-timeout-ms",
                    "grpc-timeout",
                    "x-grpc-web",
                    "x-user-agent",
                    "traceparent",
                    "tracestate",
                    caller_header,
                ],
                expose_headers=[
                    "x-request-id",
                    "x-trace-id",
                    "retry-after",
                    "grpc-status",
                    "grpc-message",
                    "grpc-status-details-bin",
                ],
            )
        )
    gate = Gate(service, guard, metrics, settings.max_request_bytes)
    connect = ConnectDoor(gate)
    routes = [
        *OpenAIDoor(gate).routes(),
        *RerankDoor(gate).routes(),
        Mount(connect.path, app=connect),
    ]
    return Starlette(routes=routes, middleware=middleware)


class ListenError(OSError):
    """A listener could not be opened (the message names the address)."""


def _listen(
    server: grpc.aio.Server,
    address: str,
    what: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Open ``address`` on ``server``; the port it got (for a TCP address)."""
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"; the usual cause is:
        raise ListenError(
            f"cannot listen for {what} on {address}: the address is in use "
            "(another server there?) or not this machine's"
        ) from None


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            f"server.tls.{what}: cannot read {path}: {error.strerror or error}"
        ) from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, callers must present a certificate it signed."""
    key = _read(tls.key_file, "key_file")
    cert = _read(tls.cert_file, "cert_file")
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=_read(tls.client_ca_file, "client_ca_file"),
        require_client_auth=True,
    )


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by an earlier run (bind fails on it); refuse to remove
    anything that is not a socket, or a socket a live server still answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"server.uds_path: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:  # refused: nothing listens there any more
            os.unlink(path)
            return
    raise ListenError(f"cannot listen on unix:{path}: another server is listening there")


class MetricsServer:
    """``GET /metrics`` on its own HTTP port, in the gateway's event loop: a listener
    the gateway starts beside its gRPC ones."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _serve(self, _request: web.Request) -> web.Response:
        body = self._metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
