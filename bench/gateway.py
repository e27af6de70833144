"""embedgate as the benchmark runs it: ``embedgate serve`` in a child process, with a
generated configuration whose one model is the fake vendor behind the ``openai``
provider, and the checks that it answers correctly.

Every setting the configuration does not name is embedgate's default, and so is the
log level (info: one access line per RPC, written to stderr, which goes to a file)
unless a case says otherwise."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.procs import BenchError, Child, pinned
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

MODEL = "bench"
VENDOR_MODEL = "fake-embedding"
EMBED_METHOD = "embedgate.v1.EmbeddingService/Embed"
TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """The knobs the benchmark cases turn; everything else is embedgate's default.
    None: the key is left out of the configuration (or the flag off the command line),
    so embedgate's own default applies."""

    vendor_port: int
    dims: int = 1024
    # What the fake vendor takes per request: a fact about the vendor, not a tuning.
    max_batch: int = 16
    coalesce_wait_ms: float | None = None
    cache: bool = True
    max_concurrency: int | None = None
    max_concurrent_rpcs: int | None = None
    log_level: str | None = None
    # Also serve the HTTP doors on this port (the OpenAI route's case).
    http_port: int | None = None
    # Traces on, every call sampled, exported over OTLP/HTTP here.
    tracing_endpoint: str | None = None


def gateway_config(settings: GatewaySettings, port: int) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": MODEL,
        "provider": "openai",
        "base_url": f"http://127.0.0.1:{settings.vendor_port}/v1",
        "vendor_model": VENDOR_MODEL,
        "dimensions": settings.dims,
        "max_batch": settings.max_batch,
    }
    if settings.max_concurrency is not None:
        model["max_concurrency"] = settings.max_concurrency
    if settings.coalesce_wait_ms is not None:
        model["coalesce_wait_ms"] = settings.coalesce_wait_ms
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 1}
    if settings.max_concurrent_rpcs is not None:
        server["max_concurrent_rpcs"] = settings.max_concurrent_rpcs
    if settings.http_port is not None:
        server["http_port"] = settings.http_port
    config: dict[str, Any] = {"server": server, "models": [model]}
    # Every h2load request embeds the same text: with the cache on (the default),
    # every call after the first is a hit. The cases that measure the vendor path
    # turn it off; the cache case keeps it.
    if not settings.cache:
        config["cache"] = {"enabled": False}
    if settings.tracing_endpoint is not None:
        config["tracing"] = {
            "enabled": True,
            "endpoint": settings.tracing_endpoint,
            "protocol": "http/protobuf",
            "sample_ratio": 1.0,
        }
    return config


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def embedgate_command(
    config: Path | None, port: int, log_level: str | None = None, log_format: str | None = None
) -> list[str]:
    """``embedgate serve`` on ``port``; None leaves the configuration file (the embedded
    local model), the log level (info) or the log format (auto) at its default."""
    executable = Path(sys.executable).parent / "embedgate"
    if not executable.exists():
        raise BenchError("the embedgate command is not installed next to this Python: make install")
    command = [str(executable), "serve", "--port", str(port)]
    if config is not None:
        command += ["--config", str(config)]
    if log_level is not None:
        command += ["--log-level", log_level]
    if log_format is not None:
        command += ["--log-format", log_format]
    return command


def start_gateway(
    name: str,
    settings: GatewaySettings,
    core: int | None,
    work_dir: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[Child, int]:
    """Start embedgate (``env`` added to its environment) and wait until it answers an
    Embed call correctly."""
    port = free_port()
    config = work_dir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(gateway_config(settings, port), sort_keys=False))
    command = embedgate_command(config, port, settings.log_level)
    child = Child(name, pinned(command, core), work_dir, env=env)
    try:
        wait_for_embed(child, port, settings.dims, timeout_s=60)
    except BaseException:
        child.stop()
        raise
    return child, port


def embed_request(model: str = MODEL) -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, inputs=[pb.Input(text=TEXT)])


def check_embed(port: int, dims: int, model: str = MODEL, timeout_s: float = 10) -> pb.Embedding:
    """One real gRPC Embed call through the generated stubs; h2load cannot see a
    failure in the trailers, so this is what says the server answers correctly."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        try:
            response = stub.Embed(embed_request(model), timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as error:
            raise BenchError(f"Embed failed: {error.code().name}: {error.details()}") from None
    if len(response.embeddings) != 1 or len(response.embeddings[0].values) != dims:
        sizes = [len(e.values) for e in response.embeddings]
        raise BenchError(f"Embed gave vectors of sizes {sizes}, expected one of {dims}")
    return response.embeddings[0]


def came_from_cache(embedding: pb.Embedding) -> bool | None:
    """The ``cached`` flag of an embedding, where the contract has one."""
    if "cached" not in pb.Embedding.DESCRIPTOR.fields_by_name:
        return None
    return bool(getattr(embedding, "cached"))  # noqa: B009 - absent from older stubs


def wait_for_embed(child: Child, port: int, dims: int, timeout_s: float) -> None:
    """Wait for the port to take connections (the process may die meanwhile), then
    for one correct answer (which may take as long as the vendor does)."""
    deadline = time.monotonic() + timeout_s
    wait_for_listening(child, port, timeout_s)
    try:
        check_embed(port, dims, timeout_s=max(1.0, deadline - time.monotonic()))
    except BenchError as problem:
        raise child.fail(str(problem)) from None


def wait_for_listening(child: Child, port: int, timeout_s: float) -> None:
    """Wait for the gateway's port to take gRPC connections; the process may die
    meanwhile."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ready = grpc.channel_ready_future(channel)
        while True:
            child.check_alive()
            try:
                ready.result(timeout=0.5)
                break
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise child.fail(f"not listening within {timeout_s:g} s") from None
