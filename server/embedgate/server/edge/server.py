"""The gRPC server's lifecycle: listeners, health, reflection, graceful shutdown."""

from __future__ import annotations

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedgate.server.config import ServerConfig
from embedgate.server.edge.service import SERVICE_NAME, EmbeddingService
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Gateway:
    """One gRPC server in front of one router.

    ``start`` loads the models, then listens; health says SERVING only once both are
    done. ``stop`` turns health NOT_SERVING at once, refuses new RPCs, lets in-flight
    ones finish within the grace period, then closes the models.
    """

    def __init__(self, router: Router, settings: ServerConfig) -> None:
        self._router = router
        self._settings = settings
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def health(self) -> health.aio.HealthServicer:
        return self._health

    async def start(self) -> int:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._settings.max_request_bytes),
                ("grpc.max_send_message_length", self._settings.max_response_bytes),
                # Serve each connection's RPCs without the default 100-stream cap surprising
                # a busy sidecar client; keepalive pings from clients are allowed.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        pb_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingService(
                self._router,
                default_deadline_s=self._settings.default_deadline_s,
                pipeline_max_in_flight=self._settings.pipeline_max_in_flight,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{self._settings.host}:{self._settings.port}"
        if ":" in self._settings.host and not self._settings.host.startswith("["):
            address = f"[{self._settings.host}]:{self._settings.port}"
        self.port = server.add_insecure_port(address)
        await self._router.start()
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "server_started",
            host=self._settings.host,
            port=self.port,
            models=[info.name for info in self._router.models()],
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        grace = self._settings.shutdown_grace_s if grace is None else grace
        # Health first, so load balancers and probes stop sending new work at once.
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            log.info("server_draining", grace_s=grace)
            await self._server.stop(grace)
        await self._router.close()
        log.info("server_stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
