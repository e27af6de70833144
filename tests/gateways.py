"""A real gateway built from a configuration dict, the way `embedgate serve` builds it,
for the tests of its operational settings (listeners, auth, overload, health, metrics)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from fakes import FakeVendor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from embedgate.server.app import build_gateway
from embedgate.server.edge.server import Gateway
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

KEY = "vendor-key-for-tests"


def openai_model(fake: FakeVendor, key_file: Path, name: str = "m", **extra: Any) -> dict[str, Any]:
    """An OpenAI-compatible model on ``fake``, quick to retry and never merging calls."""
    return {
        "name": name,
        "provider": "openai",
        "base_url": fake.base_url,
        "vendor_model": "text-embedding-3-small",
        "api_key_file": str(key_file),
        "coalesce_wait_ms": 0,
        "retry_backoff_s": 0.01,
        "retry_backoff_max_s": 0.02,
        **extra,
    }


def deployment(fake: FakeVendor | str, keys: Path, name: str, **extra: Any) -> dict[str, Any]:
    """An OpenAI-compatible deployment on ``fake`` (or at a base URL)."""
    return {
        "name": name,
        "provider": "openai",
        "base_url": fake if isinstance(fake, str) else fake.base_url,
        "vendor_model": "text-embedding-3-small",
        "api_key_file": str(keys),
        "timeout_s": 2,
        "retry_backoff_s": 0.01,
        "retry_backoff_max_s": 0.02,
        **extra,
    }


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vendor-key"
    path.write_text(KEY + "\n")
    return path


@asynccontextmanager
async def running(
    models: list[dict[str, Any]],
    *,
    quotas: dict[str, Any] | None = None,
    callers: dict[str, Any] | None = None,
    tracing: dict[str, Any] | None = None,
    cache: bool = False,
    **server: Any,
) -> AsyncIterator[Gateway]:
    """A started gateway on 127.0.0.1 (port 0 unless given), cache off unless asked for;
    ``server`` are its server settings, ``quotas``, ``callers`` and ``tracing`` those
    sections."""
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 1, **server},
            "cache": {"enabled": cache},
            "quotas": quotas or {},
            "callers": callers or {},
            "tracing": tracing or {},
            "models": models,
        }
    )
    gateway = build_gateway(config)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(grace=0)


@dataclass
class HttpServed:
    """A running gateway with its HTTP port, the vendor fake behind its model, the HTTP
    port's base URL, and a gRPC stub on the same gateway."""

    gateway: Gateway
    fake: FakeVendor
    base_url: str
    stub: pb_grpc.EmbeddingServiceAsyncStub


@asynccontextmanager
async def serving_http(
    models: list[dict[str, Any]], fake: FakeVendor, path: str = "", **server: Any
) -> AsyncIterator[HttpServed]:
    """``running`` with its HTTP port open: the served gateway, its base URL (the port's,
    then ``path``) and a gRPC stub on the same gateway."""
    async with (
        running(models, http_port=0, **server) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield HttpServed(
            gateway,
            fake,
            f"http://127.0.0.1:{gateway.http_port}{path}",
            pb_grpc.EmbeddingServiceStub(channel),
        )


def free_port() -> int:
    """A loopback TCP port nothing listens on (for a server started as a process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_serving(target: str, deadline_s: float) -> None:
    """Until the server at ``target`` (host:port or unix:path) says SERVING."""
    deadline = time.monotonic() + deadline_s
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{target} did not become SERVING in {deadline_s} s")


async def health_status(channel: grpc.aio.Channel, service: str = "") -> str:
    """The named service's status, as its name (SERVING, NOT_SERVING, SERVICE_UNKNOWN)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value; 0 when it was never recorded (as Prometheus would read it)."""
    return found.get((name, frozenset(labels.items())), 0.0)
