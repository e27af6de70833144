"""The HTTP listener as a listener: HTTP/1.1 and h2c on one port, TLS as the gRPC port
has it, the cache shared with gRPC, CORS only where configured, and a port in use named."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
import structlog
from certs import Authority
from fakes import FakeVendor, Fault, make_fake
from gateways import key_file, openai_model, running

from embedgate.server.app import build_gateway
from embedgate.server.edge.http_server import HttpListenError
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

BODY = {"model": "m", "input": "apples", "encoding_format": "float"}


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key="vendor-key-for-tests") as vendor:
        yield vendor


async def test_http1_and_h2c_on_one_port(fake: FakeVendor, tmp_path: Path) -> None:
    """The same port answers HTTP/1.1 and HTTP/2 over cleartext (prior knowledge)."""
    async with running([openai_model(fake, key_file(tmp_path))], http_port=0) as gateway:
        url = f"http://127.0.0.1:{gateway.http_port}/v1/embeddings"
        async with httpx.AsyncClient() as http1:
            one = await http1.post(url, json=BODY)
        async with httpx.AsyncClient(http1=False, http2=True) as http2:
            two = await http2.post(url, json=BODY)
    assert (one.status_code, one.http_version) == (200, "HTTP/1.1")
    assert (two.status_code, two.http_version) == (200, "HTTP/2")
    assert one.json()["data"] == two.json()["data"]


async def test_tls_covers_the_http_port(fake: FakeVendor, tmp_path: Path) -> None:
    """With TLS configured, the HTTP port speaks HTTPS with the same certificate (h2 by
    ALPN), and plain HTTP gets nothing."""
    ca = Authority("embedgate test CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    trust = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with running([openai_model(fake, key_file(tmp_path))], tls=tls, http_port=0) as gateway:
        async with httpx.AsyncClient(verify=trust, http2=True) as https:
            reply = await https.post(
                f"https://127.0.0.1:{gateway.http_port}/v1/embeddings", json=BODY
            )
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.post(f"http://127.0.0.1:{gateway.http_port}/v1/embeddings", json=BODY)
    assert (reply.status_code, reply.http_version) == (200, "HTTP/2")
    assert len(reply.json()["data"][0]["embedding"]) == fake.dims


async def test_the_cache_is_shared_with_grpc(fake: FakeVendor, tmp_path: Path) -> None:
    """A text embedded over gRPC is a cache hit through the OpenAI door, and the other
    way round: one engine, one cache."""
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "http_port": 0, "shutdown_grace_s": 1},
            "models": [openai_model(fake, key_file(tmp_path))],
        }
    )
    gateway = build_gateway(config)
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            await stub.Embed(pb.EmbedRequest(model="m", inputs=[pb.Input(text="apples")]))
            async with httpx.AsyncClient() as http:
                with structlog.testing.capture_logs() as logs:
                    reply = await http.post(
                        f"http://127.0.0.1:{gateway.http_port}/v1/embeddings",
                        json={
                            "model": "m",
                            "input": ["apples", "pears"],
                            "encoding_format": "float",
                        },
                    )
            again = await stub.Embed(pb.EmbedRequest(model="m", inputs=[pb.Input(text="pears")]))
    finally:
        await gateway.stop(grace=0)
    assert reply.status_code == 200
    (line,) = [entry for entry in logs if entry["event"] == "rpc_finished"]
    assert line["cached_inputs"] == 1
    assert again.embeddings[0].cached
    assert len(fake.received) == 2  # apples once, pears once


async def test_cors_only_for_the_configured_origins(fake: FakeVendor, tmp_path: Path) -> None:
    """Without cors_origins no browser origin is allowed; with it, the listed ones are,
    for the doors' methods and headers."""
    model = openai_model(fake, key_file(tmp_path))
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    async with running([model], http_port=0) as closed, httpx.AsyncClient() as http:
        shut = await http.options(
            f"http://127.0.0.1:{closed.http_port}/v1/embeddings", headers=preflight
        )
    async with (
        running([model], http_port=0, cors_origins=["https://app.example"]) as opened,
        httpx.AsyncClient() as http,
    ):
        allowed = await http.options(
            f"http://127.0.0.1:{opened.http_port}/v1/embeddings", headers=preflight
        )
        other = await http.options(
            f"http://127.0.0.1:{opened.http_port}/v1/embeddings",
            headers={**preflight, "origin": "https://evil.example"},
        )
    assert "access-control-allow-origin" not in shut.headers
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers


async def test_a_port_in_use_stops_the_start_and_names_it(fake: FakeVendor, tmp_path: Path) -> None:
    """A taken HTTP port fails the start with its address, as the gRPC port does."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(HttpListenError, match=f"127.0.0.1:{port}"):
            async with running([openai_model(fake, key_file(tmp_path))], http_port=port):
                pass


async def test_a_connection_outlives_a_thousand_calls(fake: FakeVendor, tmp_path: Path) -> None:
    """One HTTP/2 connection carries call after call: the server does not close it after
    some number of requests (hypercorn's default would, at 1,000)."""
    async with running([openai_model(fake, key_file(tmp_path))], http_port=0) as gateway:
        url = f"http://127.0.0.1:{gateway.http_port}/v1/models"
        connections: set[int] = set()
        async with httpx.AsyncClient(http1=False, http2=True) as http:
            statuses = set()
            for _ in range(1100):
                reply = await http.get(url)
                statuses.add(reply.status_code)
                stream = reply.extensions["network_stream"]
                connections.add(id(stream))
    assert statuses == {200}
    assert len(connections) == 1


async def test_a_call_in_progress_finishes_while_the_server_drains(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """Stopping the server lets an HTTP call already in progress finish (within the
    grace period), as gRPC calls do; after the stop the port takes no more calls."""
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "http_port": 0, "shutdown_grace_s": 5},
            "cache": {"enabled": False},
            "models": [openai_model(fake, key_file(tmp_path))],
        }
    )
    gateway = build_gateway(config)
    await gateway.start()
    url = f"http://127.0.0.1:{gateway.http_port}/v1/embeddings"
    fake.always(Fault.delay(0.5))
    async with httpx.AsyncClient() as http:
        call = asyncio.ensure_future(http.post(url, json=BODY))
        for _ in range(500):  # until the call is at the vendor (5 s at most)
            if fake.received:
                break
            await asyncio.sleep(0.01)
        assert fake.received
        await gateway.stop(grace=5)
        reply = await call
    assert reply.status_code == 200
    assert len(reply.json()["data"][0]["embedding"]) == fake.dims
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(url, json=BODY)
