"""Composition: configuration → providers → router → gateway, and the serve loop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import structlog

from embedgate.server.config import (
    AuthConfig,
    CacheConfig,
    CallerConfig,
    CallerLimits,
    ConfigError,
    ModelSettings,
    TokenConfig,
)
from embedgate.server.edge.callers import CallerLimit, Callers, limits_of
from embedgate.server.edge.guard import Caller, Tokens
from embedgate.server.edge.server import Gateway
from embedgate.server.health import Health
from embedgate.server.logs import write_unwritten
from embedgate.server.metrics import Metrics
from embedgate.server.providers.registry import (
    GatewayConfig,
    build_providers,
    quota_limits,
    read_secret,
)
from embedgate.server.providers.settings import SettingError, VendorSettings
from embedgate.server.quotas import LocalStore, SharedStore, Store
from embedgate.server.routing.cache import VectorCache
from embedgate.server.routing.deployments import assemble
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


def read_tokens(auth: AuthConfig | None) -> Tokens | None:
    """The callers' bearer tokens, read once at start-up from files or the environment
    (a message names the file or variable, never a token)."""
    if auth is None:
        return None
    callers: dict[str, Caller] = {}
    for position, entry in enumerate(auth.tokens):
        where = f"server.auth.tokens[{position}]"
        try:
            token = read_secret(entry.token_env, entry.token_file, prefix="token")
        except SettingError as problem:
            raise ConfigError(f"{where}.{problem.field}: {problem}") from None
        assert token is not None  # one of the two sources is given, by validation
        if token in callers:
            raise ConfigError(f"{where}: the same token as {callers[token].name!r}")
        models = frozenset(entry.models) if entry.models is not None else None
        callers[token] = Caller(entry.name, models)
    return Tokens(callers)


def _limited(model: ModelSettings) -> bool:
    """Whether a model entry has a vendor quota: its own, a deployment's, or a key's."""
    entries = getattr(model, "deployments", [model])
    return any(
        isinstance(entry, VendorSettings) and quota_limits(entry) is not None for entry in entries
    )


def _callers(config: GatewayConfig) -> dict[str, CallerLimits]:
    """The callers known by name, with their limits: the tokens' when auth is on, else
    ``callers.names``."""
    auth = config.server.auth
    entries: list[TokenConfig] | list[CallerConfig] = (
        auth.tokens if auth is not None else config.callers.names
    )
    return {entry.name: entry for entry in entries}


def quotas_redis_url(config: GatewayConfig) -> str | None:
    """The Redis the quotas and the callers' limits are counted in (None: memory)."""
    return config.quotas.redis_url or config.cache.redis_url


def caller_limits(config: GatewayConfig) -> list[tuple[str, CallerLimit]]:
    """Every caller's limits, as the quota store keeps them."""
    return [
        (name, limit)
        for name, settings in _callers(config).items()
        for limit in limits_of(name, settings)
    ]


def build_quota_store(config: GatewayConfig, metrics: Metrics) -> Store | None:
    """Where the vendor quotas and the callers' limits are counted: the quotas' Redis
    (else the cache's), shared by every replica; else this process. None when nothing
    has a limit."""
    callers_limited = any(limits.limited for limits in _callers(config).values())
    if not callers_limited and not any(_limited(model) for model in config.models):
        return None
    url = quotas_redis_url(config)
    if url is None:
        return LocalStore()
    gauge = metrics.quota_local
    return SharedStore(
        url,
        local_share=config.quotas.local_share,
        timeout_s=config.quotas.redis_timeout_s,
        on_local=lambda local: gauge.set(1 if local else 0),
    )


def _prices(config: GatewayConfig) -> dict[str, dict[str, float]]:
    """Each priced model's deployments' prices per million tokens ("" for a model's one
    endpoint)."""
    prices: dict[str, dict[str, float]] = {}
    for model in config.models:
        deployments = getattr(model, "deployments", None)
        entries = [(d.name, d) for d in deployments] if deployments else [("", model)]
        priced = {
            name: float(price)
            for name, entry in entries
            if (price := getattr(entry, "price_per_million_tokens", None)) is not None
        }
        if priced:
            prices[model.name] = priced
    return prices


def build_callers(config: GatewayConfig, metrics: Metrics, store: Store | None) -> Callers:
    return Callers(
        metrics,
        header=config.callers.header,
        known=_callers(config),
        store=store,
        prices=_prices(config),
    )


def build_router(
    config: GatewayConfig,
    metrics: Metrics,
    health: Health,
    *,
    cache: bool = True,
    quotas: Store | None = None,
) -> Router:
    """The router; ``quotas``: where limits are counted (default: a store of its own)."""
    if quotas is None:
        quotas = build_quota_store(config, metrics)
    providers = build_providers(
        config.models, metrics=metrics, health=health, compose=assemble, quotas=quotas
    )
    return Router(
        providers,
        coalesce_wait_s={model.name: model.coalesce_wait_ms / 1000 for model in config.models},
        cache=build_cache(config.cache) if cache else None,
        quotas=quotas,
    )


def build_gateway(config: GatewayConfig) -> Gateway:
    metrics = Metrics()
    health = Health(unhealthy_after=config.server.unhealthy_after_failures)
    quotas = build_quota_store(config, metrics)
    return Gateway(
        build_router(config, metrics, health, quotas=quotas),
        config.server,
        metrics=metrics,
        tokens=read_tokens(config.server.auth),
        models_health=health,
        callers=build_callers(config, metrics, quotas),
        tracing_settings=config.tracing,
    )


async def check(config: GatewayConfig) -> list[str]:
    """What ``embedgate check`` does: build and start every model as serving would
    (keys read, models loaded, deployments' vector spaces verified where asked), then
    stop, serving nothing. Returns a line per model; a problem raises ``ConfigError``."""
    read_tokens(config.server.auth)
    router = build_router(config, Metrics(), Health(), cache=False)
    try:
        await router.start()
    finally:
        await router.close()
    lines = []
    for model, info in zip(config.models, router.models(), strict=True):
        checked = " (vector space checked)" if getattr(model, "space_check", False) else ""
        lines.append(f"{info.name}: {info.provider}{checked}")
    return lines


# A signal sent to a process group reaches the server twice when a parent such as make
# passes it on too: repeats this close together are one request to stop, not two.
REPEAT_WINDOW_S = 0.25


def _exit_now(sig: signal.Signals) -> None:
    """A second SIGTERM or SIGINT during the drain: leave at once, as 128 + the signal
    (130 for Ctrl-C), without waiting for the RPCs still in flight."""
    log.warning("shutdown_forced", signal=sig.name)
    write_unwritten()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(128 + sig.value)


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period and return. A
    second signal ends the process at once."""
    gateway = build_gateway(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    first_at: float | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal first_at
        now = loop.time()
        if first_at is None:
            first_at = now
            stopping.set()
        elif now - first_at > REPEAT_WINDOW_S:
            _exit_now(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop(grace=0)
        raise
    await stopping.wait()
    log.info("shutdown_requested")
    await gateway.stop()
