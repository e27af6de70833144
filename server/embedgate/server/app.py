"""Composition: configuration → providers → router → gateway, and the serve loop."""

from __future__ import annotations

import asyncio
import signal

import structlog

from embedgate.server.config import CacheConfig, Config
from embedgate.server.edge.server import Gateway
from embedgate.server.providers.registry import build_providers
from embedgate.server.routing.cache import VectorCache
from embedgate.server.routing.router import Router

log = structlog.get_logger(__name__)


def build_cache(config: CacheConfig) -> VectorCache | None:
    if not config.enabled:
        return None
    return VectorCache(
        max_bytes=config.max_bytes,
        ttl_s=config.ttl_s,
        redis_url=config.redis_url,
        redis_timeout_s=config.redis_timeout_s,
    )


def build_gateway(config: Config) -> Gateway:
    router = Router(
        build_providers(config.models),
        coalesce_wait_s={model.name: model.coalesce_wait_ms / 1000 for model in config.models},
        cache=build_cache(config.cache),
    )
    return Gateway(router, config.server)


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period and return."""
    gateway = build_gateway(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop(grace=0)
        raise
    await stopping.wait()
    log.info("shutdown_requested")
    await gateway.stop()
