"""Sending vendor requests: one attempt behind a small seam, and the retries around it.

A ``Sender`` makes exactly one attempt. ``HttpDriver`` is the real one: one
``httpx.AsyncClient`` (one connection pool) for the whole process, and the only place
where httpx's and aiohttp's exceptions are translated (``TransportFailure``: no reply
came). Tests script a sender in memory.

``post`` is the retry loop around a sender: it retries what HTTP says may be retried
(408, 429, 5xx, connection errors, attempts that took too long) with exponential
backoff and full jitter, honours ``Retry-After``, and never waits or sends past the
caller's deadline. It knows HTTP, not vendors: what a reply means is the dialect's
business.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol, get_args
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx
import structlog
from httpx_aiohttp import HttpxAiohttpClient
from opentelemetry.trace import SpanKind, StatusCode

from embedgate.server import tracing
from embedgate.server.deadlines import current_deadline
from embedgate.server.errors import DeadlineExceededError, VendorBadReplyError
from embedgate.server.metrics import VendorMeter

log = structlog.get_logger("embedgate.vendor")

# A vendor reply bigger than this is refused rather than buffered: 512 vectors of 4096
# floats as JSON text are about 45 MiB.
MAX_REPLY_BYTES = 128 * 1024 * 1024

Transport = Literal["httpx", "aiohttp"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)
# aiohttp's pool under the same httpx client, against httpx's own (bench/transport.py,
# medians of 18 rounds): 1.2x the requests/s at 1 call in flight, 3.6x at 16, 8.7x at 64,
# for 0.74x, 0.27x and 0.12x the CPU per call, and a p99 of ~50 ms instead of ~1.2 s at
# 64: httpcore's pool bookkeeping grows with the calls in flight (encode/httpx#3215).
# The one difference seen on the wire: aiohttp refuses a reply header line longer than
# 8190 bytes, which httpcore accepts (up to 100 KiB of headers).
DEFAULT_TRANSPORT: Transport = "aiohttp"

_CLIENTS: dict[Transport, type[httpx.AsyncClient]] = {
    "httpx": httpx.AsyncClient,
    # The client class, not `httpx.AsyncClient(transport=AiohttpTransport())`: given a
    # transport, httpx ignores HTTP(S)_PROXY and NO_PROXY; this class sends them through
    # aiohttp as well.
    "aiohttp": HttpxAiohttpClient,
}
# What each transport raises when no HTTP reply came at all. httpx-aiohttp lets some of
# aiohttp's errors through untranslated: a reply that is not HTTP (bad status line, bad
# header, bad chunk) raises aiohttp.ClientResponseError where httpx raises
# RemoteProtocolError.
_NO_REPLY: dict[Transport, tuple[type[Exception], ...]] = {
    "httpx": (httpx.TransportError,),
    "aiohttp": (httpx.TransportError, aiohttp.ClientError),
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one model's vendor calls are retried and timed."""

    max_retries: int = 2
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    # One attempt's limit, however much of the caller's deadline is left.
    attempt_timeout_s: float = 30.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before attempt ``attempt + 1``: exponential, capped, with full
        jitter (any time from 0 to the ceiling)."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class HttpReply:
    """An HTTP reply, whole; from ``post``, the last one of a call and the attempts it
    took. ``headers`` look names up in any case (``httpx.Headers``)."""

    status: int
    content: bytes
    headers: Mapping[str, str]
    attempts: int = 1

    @property
    def retry_after_s(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class TransportFailure(Exception):  # noqa: N818 - a condition, reported through VendorError
    """No HTTP reply at all: the connection failed, was reset, or an attempt ran out of
    time. Retried; raised once the retries are spent, with the attempts made."""

    def __init__(self, description: str, *, attempts: int = 1) -> None:
        super().__init__(description)
        self.description = description
        self.attempts = attempts


class Sender(Protocol):
    """What carries vendor requests: one attempt per ``send``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        """POST ``body`` once: the whole reply, whatever its status. Raises
        ``TransportFailure`` when no reply came, ``VendorBadReplyError`` when one came
        that cannot be read (too big, or a body that does not decompress)."""
        ...


Sleep = Callable[[float], Awaitable[None]]


def retryable_status(status: int) -> bool:
    """408 and 429 ask to come back later; 5xx may be transient. Other 4xx never are."""
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _describe(error: Exception) -> str:
    # The class name says what happened (ConnectError, ReadError, RemoteProtocolError);
    # the message may carry addresses, which is fine, but never headers. httpx-aiohttp
    # re-raises aiohttp's errors as httpx ones, but its table turns every connection error
    # (refused, reset, closed early, no such host) into a ConnectTimeout: the aiohttp error
    # it came from, kept as the cause, is the one that says what happened.
    cause = error.__cause__
    if isinstance(error, httpx.TransportError) and isinstance(cause, aiohttp.ClientError):
        error = cause
    # aiohttp's ClientResponseError prints its message as a repr; the message itself spans
    # several lines (a parser error points at the bad byte).
    text = error.message if isinstance(error, aiohttp.ClientResponseError) else str(error)
    text = " ".join(text.split())
    name = type(error).__name__
    return f"{name}: {text}" if text else name


class HttpDriver:
    """The ``Sender`` that speaks HTTP: owns the shared ``httpx.AsyncClient``, opened by
    the first provider that starts, closed when the last one closes.

    ``transport`` picks what carries the bytes: ``"httpx"`` (httpcore) or ``"aiohttp"``
    (aiohttp's connection pool under the same httpx client, through ``httpx-aiohttp``).
    """

    def __init__(
        self,
        *,
        max_connections: int = 256,
        trust_env: bool = True,
        transport: Transport = DEFAULT_TRANSPORT,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown HTTP transport {transport!r}: one of {TRANSPORTS}")
        self._max_connections = max_connections
        self._trust_env = trust_env
        self._transport: Transport = transport
        self._max_reply_bytes = max_reply_bytes
        self._client: httpx.AsyncClient | None = None
        # One entry per vendor address the providers post to: a handful.
        self._urls: dict[str, httpx.URL] = {}
        self._no_reply = _NO_REPLY[transport]
        self._users = 0

    @property
    def transport(self) -> Transport:
        return self._transport

    async def start(self) -> None:
        self._users += 1
        if self._client is None:
            self._client = _CLIENTS[self._transport](
                # Time is governed by asyncio timeouts (attempt limit, caller deadline),
                # which also bound a reply that trickles in one byte at a time. (aiohttp
                # gets the same: no connect, read or pool timeout of its own.)
                timeout=httpx.Timeout(None),
                # aiohttp takes max_connections as its connector's limit and keeps every
                # idle connection, the same as max_keepalive_connections=max_connections.
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=self._max_connections,
                ),
                trust_env=self._trust_env,
                follow_redirects=False,
            )

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        client = self._client
        if client is None:
            raise RuntimeError("the HTTP driver is not started")
        # Parsed once per address: httpx parses a string URL on every request (~30 µs).
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx.URL(url)
        try:
            async with client.stream("POST", parsed, content=body, headers=headers) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in _decoded(response):
                    size += len(chunk)
                    if size > self._max_reply_bytes:
                        raise VendorBadReplyError(
                            f"the reply is larger than {_size(self._max_reply_bytes)}"
                        )
                    chunks.append(chunk)
                return HttpReply(response.status_code, b"".join(chunks), response.headers)
        except self._no_reply as error:
            raise TransportFailure(_describe(error)) from None


async def post(
    sender: Sender,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    policy: RetryPolicy,
    limit: asyncio.Semaphore,
    vendor: str,
    meter: VendorMeter | None = None,
    sleep: Sleep = asyncio.sleep,
    retryable: Callable[[int], bool] = retryable_status,
    admit: Callable[[], Awaitable[None]] | None = None,
) -> HttpReply:
    """POST ``body`` until a final reply: one that is not retryable, or the last one
    when retries are spent or the next wait would pass the deadline. Raises
    ``TransportFailure`` when no reply came at all, ``DeadlineExceededError`` when the
    caller's deadline passed. ``admit`` is awaited before each attempt (a quota's take:
    it may wait, or raise to end the request). Written as a plain loop rather than with
    tenacity: the rules read top to bottom, and the common first-attempt reply builds
    nothing."""
    deadline = current_deadline()
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        attempt += 1
        if admit is not None:
            await admit()
        outcome: HttpReply | TransportFailure
        try:
            outcome = await _attempt(
                sender, url, body, headers, policy, limit, vendor, meter, deadline, attempt
            )
        except TransportFailure as failure:
            outcome = failure
        if isinstance(outcome, HttpReply) and not retryable(outcome.status):
            return dataclasses.replace(outcome, attempts=attempt) if attempt > 1 else outcome
        if attempt > policy.max_retries:
            return _last(outcome, attempt)
        delay = _delay(outcome, attempt, policy)
        if deadline is not None and loop.time() + delay >= deadline:
            # Waiting only to fail later helps no one: the caller hears the vendor now.
            return _last(outcome, attempt)
        if meter is not None:
            meter.retries.inc()
        log.warning(
            "vendor_retry",
            vendor=vendor,
            attempt=attempt,
            wait_s=round(delay, 3),
            http_status=outcome.status if isinstance(outcome, HttpReply) else None,
            error=str(outcome) if isinstance(outcome, TransportFailure) else None,
        )
        await sleep(delay)


async def _attempt(
    sender: Sender,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    policy: RetryPolicy,
    limit: asyncio.Semaphore,
    vendor: str,
    meter: VendorMeter | None,
    deadline: float | None,
    number: int = 1,
) -> HttpReply:
    """One attempt, within the attempt's limit and the caller's ``deadline``, counted
    among the model's requests in flight (``limit``) and metered; traced as an HTTP
    client span (the vendor gets its ``traceparent``)."""
    if not tracing.active():
        return await _attempt_untraced(
            sender, url, body, headers, policy, limit, vendor, meter, deadline
        )
    parts = urlsplit(url)
    attributes = {
        "http.request.method": "POST",
        # Without the query: a vendor may take its key there.
        "url.full": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "embedgate.attempt": number,
        **tracing.inherited(),
    }
    with tracing.span("POST", attributes, kind=SpanKind.CLIENT) as span:
        try:
            reply = await _attempt_untraced(
                sender,
                url,
                body,
                tracing.inject(headers),
                policy,
                limit,
                vendor,
                meter,
                deadline,
            )
        except Exception as error:
            failure = isinstance(error, TransportFailure)
            span.set_attribute("error.type", "transport" if failure else type(error).__name__)
            span.set_status(StatusCode.ERROR)
            raise
        span.set_attribute("http.response.status_code", reply.status)
        if reply.status >= 400:
            span.set_attribute("error.type", str(reply.status))
            span.set_status(StatusCode.ERROR)
        return reply


async def _attempt_untraced(
    sender: Sender,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    policy: RetryPolicy,
    limit: asyncio.Semaphore,
    vendor: str,
    meter: VendorMeter | None,
    deadline: float | None,
) -> HttpReply:
    async with limit:
        loop = asyncio.get_running_loop()
        bound = policy.attempt_timeout_s
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise _deadline_passed(vendor)
            bound = min(bound, left)
        if meter is not None:
            meter.in_flight.inc()
        started = loop.time()
        outcome: int | str = "error"  # the HTTP status, or why there is none
        try:
            async with asyncio.timeout(bound):
                reply = await sender.send(url, body, headers)
            outcome = reply.status
            return reply
        except TimeoutError:
            outcome = "timeout"
            if deadline is not None and loop.time() >= deadline - 0.001:
                raise _deadline_passed(vendor) from None
            raise TransportFailure(
                f"no complete reply within {policy.attempt_timeout_s:g} s"
            ) from None
        finally:
            if meter is not None:
                meter.in_flight.dec()
                meter.attempt(outcome, loop.time() - started)


def _delay(outcome: HttpReply | TransportFailure, attempt: int, policy: RetryPolicy) -> float:
    """How long to wait before attempt ``attempt + 1``: what the vendor asked for
    (``Retry-After``), else exponential backoff with full jitter."""
    if isinstance(outcome, HttpReply):
        asked = outcome.retry_after_s
        if asked is not None:
            return asked
    return policy.backoff(attempt)


def _last(outcome: HttpReply | TransportFailure, attempts: int) -> HttpReply:
    """The call's final outcome after ``attempts`` attempts: its reply, or its failure
    raised."""
    if isinstance(outcome, TransportFailure):
        raise TransportFailure(outcome.description, attempts=attempts)
    return dataclasses.replace(outcome, attempts=attempts)


async def _decoded(response: httpx.Response) -> AsyncIterator[bytes]:
    """The reply's body, decompressed as its Content-Encoding says; a body that does
    not decompress is a bad reply (the vendor answered, with something unusable)."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.DecodingError as error:
        raise VendorBadReplyError(
            f"the reply's {response.headers.get('content-encoding', '')} body could not be "
            f"decompressed ({type(error).__name__})"
        ) from None


def _size(limit: int) -> str:
    mib, rest = divmod(limit, 1024 * 1024)
    return f"{mib} MiB" if mib and not rest else f"{limit} bytes"


def _deadline_passed(vendor: str) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"the deadline passed while waiting for {vendor}", metadata={"vendor": vendor}
    )
