"""The HTTP listener as a listener: HTTP/1.1 and h2c on one port, TLS as the gRPC port
has it, the cache shared with gRPC, CORS only where configured, and a port in use named;
and a token, a model scope, TLS and the cache the same on every door."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
import pytest_asyncio
import structlog
from certs import Authority
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from fakes import FakeVendor, Fault, make_fake
from gateways import key_file, openai_model, running
from google.protobuf import json_format
from pyqwest import Client, HTTPTransport

from embedgate.server.app import build_gateway
from embedgate.server.edge.http_server import HttpListenError
from embedgate.server.edge.server import Gateway
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc
from embedgate.v1.embedding_service_connect import EmbeddingServiceClient

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


# ---- The same behaviour on every door: gRPC, the OpenAI API, rerank, Connect, gRPC-Web.

DOORS = ("grpc", "openai", "rerank", "connect", "grpc-web")
DOOR_TOKEN = "door-token-canary-5e1f"  # noqa: S105
SCOPED_TOKEN = "scoped-token-canary-0b7d"  # noqa: S105
# An HTTP door's status, as the gRPC code it stands for.
_BY_STATUS = {200: "OK", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}


@dataclass
class Doors:
    """Where a running gateway's doors are, and how a client reaches them."""

    gateway: Gateway
    scheme: str = "http"
    ca_pem: bytes | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.gateway.http_port}"

    def channel(self) -> grpc.aio.Channel:
        target = f"127.0.0.1:{self.gateway.port}"
        if self.ca_pem is None:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        )

    def http(self) -> httpx.AsyncClient:
        verify = ssl.create_default_context(cadata=self.ca_pem.decode()) if self.ca_pem else True
        return httpx.AsyncClient(base_url=self.base_url, verify=verify)

    def connect_client(self) -> EmbeddingServiceClient:
        transport = HTTPTransport(tls_ca_cert=self.ca_pem) if self.ca_pem else HTTPTransport()
        return EmbeddingServiceClient(
            self.base_url, protocol=ProtocolType.GRPC_WEB, http_client=Client(transport)
        )

    async def call(self, door: str, model: str, text: str, token: str | None = None) -> str:
        """Embeds ``text`` with ``model`` through ``door`` (a rerank of it, through the
        rerank door); the outcome as a gRPC code's name."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        request = pb.EmbedRequest(model=model, inputs=[pb.Input(text=text)])
        if door == "grpc":
            async with self.channel() as channel:
                try:
                    await pb_grpc.EmbeddingServiceStub(channel).Embed(
                        request, metadata=tuple(headers.items())
                    )
                except grpc.aio.AioRpcError as error:
                    return error.code().name
            return "OK"
        if door == "grpc-web":
            async with self.connect_client() as client:
                try:
                    await client.embed(request, headers=headers)
                except ConnectError as error:
                    return error.code.name
            return "OK"
        async with self.http() as http:
            if door == "openai":
                reply = await http.post(
                    "/v1/embeddings",
                    json={"model": model, "input": text, "encoding_format": "float"},
                    headers=headers,
                )
            elif door == "rerank":
                reply = await http.post(
                    "/v1/rerank",
                    json={"model": model, "query": text, "documents": [text]},
                    headers=headers,
                )
            else:
                reply = await http.post(
                    "/embedgate.v1.EmbeddingService/Embed",
                    json=json_format.MessageToDict(request),
                    headers=headers,
                )
        return _BY_STATUS.get(reply.status_code, str(reply.status_code))


async def test_a_token_is_required_on_every_door(fake: FakeVendor, tmp_path: Path) -> None:
    """With auth on, every door refuses a call without a token or with a wrong one, and
    serves one with a valid token."""
    (tmp_path / "token").write_text(DOOR_TOKEN)
    auth = {"tokens": [{"name": "app", "token_file": str(tmp_path / "token")}]}
    async with running([openai_model(fake, key_file(tmp_path))], http_port=0, auth=auth) as gw:
        doors = Doors(gw)
        outcomes = {
            door: (
                await doors.call(door, "m", "apples"),
                await doors.call(door, "m", "apples", token=DOOR_TOKEN[::-1]),
                await doors.call(door, "m", "apples", token=DOOR_TOKEN),
            )
            for door in DOORS
        }
    assert outcomes == dict.fromkeys(DOORS, ("UNAUTHENTICATED", "UNAUTHENTICATED", "OK"))


async def test_a_model_scope_holds_on_every_door(fake: FakeVendor, tmp_path: Path) -> None:
    """A token limited to one model may use it, and no other, through every door."""
    (tmp_path / "token").write_text(SCOPED_TOKEN)
    auth = {"tokens": [{"name": "small", "token_file": str(tmp_path / "token"), "models": ["m"]}]}
    keys = key_file(tmp_path)
    models = [openai_model(fake, keys), openai_model(fake, keys, name="other")]
    async with running(models, http_port=0, auth=auth) as gw:
        doors = Doors(gw)
        outcomes = {
            door: (
                await doors.call(door, "m", "apples", token=SCOPED_TOKEN),
                await doors.call(door, "other", "apples", token=SCOPED_TOKEN),
            )
            for door in DOORS
        }
    assert outcomes == dict.fromkeys(DOORS, ("OK", "PERMISSION_DENIED"))


async def test_tls_covers_every_door(fake: FakeVendor, tmp_path: Path) -> None:
    """With TLS configured, every door answers over TLS with the same certificate, and
    the HTTP port takes no plaintext."""
    ca = Authority("embedgate test CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    async with running([openai_model(fake, key_file(tmp_path))], tls=tls, http_port=0) as gw:
        doors = Doors(gw, scheme="https", ca_pem=ca.cert_pem)
        outcomes = {door: await doors.call(door, "m", "apples") for door in DOORS}
        plain = Doors(gw)
        refused = {door: await _plain(plain, door) for door in DOORS if door != "grpc"}
    assert outcomes == dict.fromkeys(DOORS, "OK")
    assert "OK" not in refused.values(), refused


async def _plain(doors: Doors, door: str) -> str:
    try:
        return await doors.call(door, "m", "apples")
    except httpx.HTTPError as error:
        return type(error).__name__


async def test_the_cache_serves_every_door(fake: FakeVendor, tmp_path: Path) -> None:
    """A text embedded once, through any door, is a cache hit through every other: the
    vendor sees it once, and each later Embed's access line counts it as cached."""
    model = openai_model(fake, key_file(tmp_path))
    async with running([model], http_port=0, cache=True) as gateway:
        doors = Doors(gateway)
        with structlog.testing.capture_logs() as logs:
            outcomes = [await doors.call(door, "m", "apples") for door in (*DOORS, *DOORS)]
    assert outcomes == ["OK"] * 2 * len(DOORS)
    sent = [item for received in fake.received for item in received.body["input"]]
    assert sent == ["apples"]
    lines = [e for e in logs if e["event"] == "rpc_finished" and e["method"] == "Embed"]
    assert [e["cached_inputs"] for e in lines] == [0] + [1] * (len(lines) - 1)
    assert {e.get("protocol", "grpc") for e in lines} == set(DOORS) - {"rerank"}


MIB = 1024 * 1024


async def test_a_body_over_max_request_bytes_is_refused_on_every_http_door(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """server.max_request_bytes bounds an HTTP body as it bounds a gRPC message: a
    larger one is refused, whether its length is declared or it comes in chunks, with
    REQUEST_TOO_LARGE in each door's shape and an access line; nothing reaches the
    vendor. A request of EmbedPipeline's stream is bounded one by one."""
    model = openai_model(fake, key_file(tmp_path))
    big = "x" * (MIB + 10)
    openai_body = orjson.dumps({"model": "m", "input": big})
    connect_body = orjson.dumps({"model": "m", "inputs": [{"text": big}]})

    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    async with running([model], http_port=0, max_request_bytes=MIB) as gateway:
        base = f"http://127.0.0.1:{gateway.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            with structlog.testing.capture_logs() as logs:
                declared = await http.post("/v1/embeddings", content=openai_body)
                streamed = await http.post("/v1/embeddings", content=chunked(openai_body))
                rerank = await http.post("/v1/rerank", content=openai_body)
                connect = await http.post(
                    "/embedgate.v1.EmbeddingService/Embed",
                    content=connect_body,
                    headers={"content-type": "application/json"},
                )
                connect_chunked = await http.post(
                    "/embedgate.v1.EmbeddingService/Embed",
                    content=chunked(connect_body),
                    headers={"content-type": "application/json"},
                )
        request = pb.EmbedPipelineRequest(
            correlation_id="a", request=pb.EmbedRequest(model="m", inputs=[pb.Input(text=big)])
        ).SerializeToString()
        async with httpx.AsyncClient(base_url=base, http1=False, http2=True) as http2:
            pipeline = await http2.post(
                "/embedgate.v1.EmbeddingService/EmbedPipeline",
                content=struct.pack(">BI", 0, len(request)) + request,
                headers={"content-type": "application/connect+proto"},
            )
    for reply in (declared, streamed, rerank):
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == "REQUEST_TOO_LARGE"
        assert "max_request_bytes" in reply.json()["error"]["message"]
    for reply in (connect, connect_chunked):
        assert reply.status_code == 429
        error = reply.json()
        assert error["code"] == "resource_exhausted"
        assert error["details"][0]["debug"]["reason"] == "REQUEST_TOO_LARGE"
    end = pipeline.content[5:]
    assert pipeline.content[0] == 0x02
    assert json.loads(end)["error"]["code"] == "resource_exhausted"
    assert "a request of the stream is larger" in json.loads(end)["error"]["message"]
    lines = [e for e in logs if e["event"] == "rpc_finished"]
    assert [(e["method"], e["reason"]) for e in lines] == [
        ("Embed", "REQUEST_TOO_LARGE"),
        ("Embed", "REQUEST_TOO_LARGE"),
        ("Rerank", "REQUEST_TOO_LARGE"),
        ("Embed", "REQUEST_TOO_LARGE"),
        ("Embed", "REQUEST_TOO_LARGE"),
    ]
    assert fake.received == []
