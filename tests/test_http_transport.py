"""The HTTP driver behaves the same on both of its transports (httpx's own and aiohttp's,
through httpx-aiohttp): each test runs against a loopback fake on each of them, so the one
that is not the default stays tested too."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import orjson
import pytest
import pytest_asyncio
from fakes import FakeVendor, Fault, fake_vector, item_key, make_fake
from vendor_world import eventually

from embedgate.server.deadlines import deadline_scope
from embedgate.server.errors import DeadlineExceededError, VendorBadReplyError
from embedgate.server.providers import http
from embedgate.server.providers.http import (
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    HttpDriver,
    HttpReply,
    RetryPolicy,
    Transport,
    TransportFailure,
)

KEY = "test-key"
DIMS = 256
BODY = orjson.dumps(
    {"model": "text-embedding-3-small", "input": ["a"], "encoding_format": "base64"}
)
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
FAST = RetryPolicy(max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.05, attempt_timeout_s=5)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Transport:
    value: Transport = request.param
    return value


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key=KEY, dims=DIMS) as vendor:
        yield vendor


@asynccontextmanager
async def started(driver: HttpDriver) -> AsyncIterator[HttpDriver]:
    await driver.start()
    try:
        yield driver
    finally:
        await driver.close()


@pytest_asyncio.fixture
async def driver(transport: Transport) -> AsyncIterator[HttpDriver]:
    async with started(HttpDriver(transport=transport)) as opened:
        yield opened


async def post(
    driver: HttpDriver, url: str, policy: RetryPolicy = FAST, body: bytes = BODY
) -> HttpReply:
    return await http.post(
        driver, url, body, HEADERS, policy=policy, limit=asyncio.Semaphore(4), vendor="Fake"
    )


async def failure(driver: HttpDriver, url: str, policy: RetryPolicy = FAST) -> TransportFailure:
    with pytest.raises(TransportFailure) as caught:
        await post(driver, url, policy)
    return caught.value


@asynccontextmanager
async def raw_server(reply: bytes) -> AsyncIterator[str]:
    """A loopback server that reads a request's head and answers `reply` verbatim, then
    closes: for replies no real HTTP server would send."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/embeddings"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def closed_port() -> int:
    """A loopback port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_default_transport_is_the_drivers_and_others_are_refused() -> None:
    """A driver built without a transport uses DEFAULT_TRANSPORT; an unknown name fails
    at construction, not at the first call."""
    assert HttpDriver().transport == DEFAULT_TRANSPORT
    assert DEFAULT_TRANSPORT in TRANSPORTS
    with pytest.raises(ValueError, match="unknown HTTP transport"):
        HttpDriver(transport="curl")  # type: ignore[arg-type]


async def test_a_good_reply_arrives_whole(fake: FakeVendor, driver: HttpDriver) -> None:
    """A 200 comes back with its status, body and headers as the vendor sent them, after
    one attempt, and the request reaches the vendor as sent."""
    reply = await post(driver, fake.base_url + "/embeddings")
    assert (reply.status, reply.attempts) == (200, 1)
    assert reply.headers["content-type"].startswith("application/json")
    (item,) = orjson.loads(reply.content)["data"]
    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, fake_vector(item_key(text="a"), DIMS))
    (received,) = fake.received
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.body == orjson.loads(BODY)


async def test_many_calls_share_the_pool(fake: FakeVendor, driver: HttpDriver) -> None:
    """Concurrent calls all get their reply, at most `limit` at a time at the vendor."""
    limit = asyncio.Semaphore(3)
    replies = await asyncio.gather(
        *(
            http.post(
                driver,
                fake.base_url + "/embeddings",
                BODY,
                HEADERS,
                policy=FAST,
                limit=limit,
                vendor="F",
            )
            for _ in range(20)
        )
    )
    assert [r.status for r in replies] == [200] * 20
    assert len(fake.received) == 20
    assert fake.max_in_flight <= 3


async def test_retry_after_is_honoured(fake: FakeVendor, driver: HttpDriver) -> None:
    """A 429 with Retry-After is retried (the header is read through either transport)."""
    fake.plan(Fault.status(429, retry_after="0"))
    reply = await post(driver, fake.base_url + "/embeddings")
    assert (reply.status, reply.attempts) == (200, 2)


async def test_a_reset_is_retried_then_reported(fake: FakeVendor, driver: HttpDriver) -> None:
    """A connection reset before any reply is retried; resets every time end as a
    TransportFailure after 1 + max_retries attempts, named for what happened (not a
    timeout: httpx-aiohttp calls every aiohttp connection error a ConnectTimeout)."""
    url = fake.base_url + "/embeddings"
    fake.plan(Fault.reset())
    reply = await post(driver, url)
    assert (reply.status, reply.attempts) == (200, 2)
    fake.always(Fault.reset())
    failed = await failure(driver, url)
    assert failed.attempts == 3
    assert "Timeout" not in failed.description


async def test_a_refused_connection_is_a_transport_failure(
    driver: HttpDriver, closed_port: int
) -> None:
    """Nothing listening: retried, then a TransportFailure that says it could not connect
    (not that it timed out)."""
    failed = await failure(driver, f"http://127.0.0.1:{closed_port}/v1/embeddings")
    assert failed.attempts == 3
    assert "Timeout" not in failed.description
    assert "Connect" in failed.description


@pytest.mark.parametrize("fault", [Fault.hang(), Fault.drip(0.05)], ids=["hang", "drip"])
async def test_a_stuck_attempt_is_cut_by_its_timeout(
    fake: FakeVendor, driver: HttpDriver, fault: Fault
) -> None:
    """An attempt that gets no complete reply within attempt_timeout_s (no answer, or a
    body a byte at a time) is abandoned and retried, and the vendor sees the connection
    go away."""
    fake.always(fault)
    policy = RetryPolicy(max_retries=1, backoff_initial_s=0.01, attempt_timeout_s=0.3)
    started_at = time.perf_counter()
    failed = await failure(driver, fake.base_url + "/embeddings", policy)
    assert time.perf_counter() - started_at < 3
    assert failed.attempts == 2
    assert failed.description == "no complete reply within 0.3 s"
    assert len(fake.received) == 2
    await eventually(lambda: fake.disconnects >= 1)
    await eventually(lambda: fake.in_flight == 0)


async def test_a_hang_ends_with_the_callers_deadline(fake: FakeVendor, driver: HttpDriver) -> None:
    """The caller's deadline cuts an attempt shorter than its own timeout: the call ends
    DeadlineExceeded, not TransportFailure, and is not retried."""
    fake.always(Fault.hang())
    started_at = time.perf_counter()
    with deadline_scope(0.3), pytest.raises(DeadlineExceededError):
        await post(driver, fake.base_url + "/embeddings")
    assert time.perf_counter() - started_at < 3
    assert len(fake.received) == 1
    await eventually(lambda: fake.disconnects >= 1)


async def test_an_oversized_reply_is_refused_and_the_pool_recovers(
    fake: FakeVendor, transport: Transport
) -> None:
    """A reply larger than max_reply_bytes is refused as a bad reply (not retried), and
    the driver goes on serving smaller replies."""
    url = fake.base_url + "/embeddings"
    async with started(HttpDriver(transport=transport, max_reply_bytes=1024)) as small:
        fake.plan(Fault.status(400))
        assert (await post(small, url)).status == 400  # an error body fits
        with pytest.raises(VendorBadReplyError, match="larger than 1024 bytes"):
            await post(small, url)  # 256 base64 floats do not
        assert len(fake.received) == 2
        fake.plan(Fault.status(400))
        assert (await post(small, url)).status == 400


@pytest.mark.parametrize(
    "reply",
    [
        b"HELLO\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n",
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"data": [',
    ],
    ids=["not-http", "bad-content-length", "bad-chunk", "cut-short"],
)
async def test_a_reply_that_breaks_http_is_a_transport_failure(
    driver: HttpDriver, reply: bytes
) -> None:
    """A reply that is not valid HTTP, or ends before its Content-Length, is a
    TransportFailure on one line, retried like a reset: aiohttp raises its own errors for
    some of these, which must not escape as anything else."""
    async with raw_server(reply) as url:
        failed = await failure(driver, url)
    assert failed.attempts == 3
    assert "\n" not in failed.description


async def test_a_body_that_will_not_decompress_is_a_bad_reply(driver: HttpDriver) -> None:
    """A gzip body that is not gzip reaches the caller as VENDOR_BAD_REPLY, not as an
    error the driver does not know."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"
    async with raw_server(reply) as url:
        with pytest.raises(VendorBadReplyError, match="could not be decompressed"):
            await post(driver, url)
