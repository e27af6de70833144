"""The contract's own service on the HTTP port, over the Connect protocol (JSON and
binary) and gRPC-Web: for browsers, and for callers that have HTTP/1.1 or curl but no
gRPC. connect-python reads and writes the protocols (its ASGI application, from the code
its plugin generates); each call goes to the gRPC servicer through a ``DoorContext``,
with the same admission, checks, engine and access line (``protocol: connect`` or
``grpc-web``), and fails with the same code, message and ``google.rpc`` details.

- Deadlines: the caller's ``Connect-Timeout-Ms`` (Connect) or ``grpc-timeout``
  (gRPC-Web); a call still running then ends with DEADLINE_EXCEEDED. Without one, the
  server's ``default_deadline_s`` bounds the vendor calls, as on the gRPC port.
- The request id comes back as the ``x-request-id`` response header of a unary call,
  and in the trailers of a stream (as gRPC sends it).
- ``EmbedPipeline`` is served too. Over HTTP/2 (h2c, or h2 with TLS) requests and replies
  flow both ways at once; over HTTP/1.1 a client must send every request before it reads
  a reply, and browsers cannot stream a request body at all: from a browser, use
  ``StreamEmbed``.
- A body that does not parse as the method's request is INVALID_ARGUMENT
  (``MALFORMED_REQUEST``), as on the gRPC port. connect-python 0.9 would answer it with
  UNKNOWN (HTTP 500) and has no option for it: ``_strict_codecs`` wraps its codec table
  (the version is pinned below 0.10, and the tests hold the behaviour).
- A body is at most ``server.max_request_bytes``, as read and as inflated from gzip
  (``REQUEST_TOO_LARGE``); ``EmbedPipeline``'s stream of requests, each of them.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from connectrpc import _codec
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import Headers, RequestContext

from embedgate.server.edge.access import DOOR
from embedgate.server.edge.doors import (
    BodyMeter,
    DoorAbortedError,
    DoorContext,
    Gate,
    admitted,
    echoed,
    refused_line,
)
from embedgate.server.edge.guard import Malformed
from embedgate.server.edge.status import grpc_code, to_rpc_status
from embedgate.server.errors import EmbedgateError, MalformedRequestError, echo
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1.embedding_service_connect import EmbeddingServiceASGIApplication

# The most of a parser's complaint a MALFORMED_REQUEST message quotes.
PROBLEM_LIMIT = 300

Req = TypeVar("Req")
Res = TypeVar("Res")


def _code(code: grpc.StatusCode) -> Code:
    """Connect's name for a gRPC status code (the same codes; one spelled differently)."""
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code[code.name]


def _connect_error(aborted: DoorAbortedError) -> ConnectError:
    return ConnectError(_code(aborted.code), aborted.message, aborted.status.details)


@contextmanager
def _ended_as_connect(headers: Headers) -> Iterator[None]:
    """A call the service ended with an error status, or whose deadline passed, ended as
    a ``ConnectError``; its request id into ``headers`` (a unary call's headers, or a
    stream's trailers)."""
    try:
        yield
    except DoorAbortedError as aborted:
        _carry(headers, aborted.metadata)
        raise _connect_error(aborted) from None
    except TimeoutError:
        raise ConnectError(
            Code.DEADLINE_EXCEEDED,
            "the call's deadline (its timeout header) passed before it ended",
        ) from None


@dataclass(slots=True)
class _Call:
    """One HTTP request to the Connect application: whether a handler took it, and why
    its body was refused before that, if it was."""

    served: bool = False
    refused: EmbedgateError | None = None


_CALL: ContextVar[_Call | None] = ContextVar("embedgate_connect_call", default=None)


def _as_connect_error(error: EmbedgateError) -> ConnectError:
    status = to_rpc_status(error)
    return ConnectError(_code(grpc_code(error)), status.message, status.details)


class _MalformedMessageError(ConnectError):
    """A request message that does not parse (raised by the codec)."""

    def __init__(self, error: MalformedRequestError) -> None:
        status = to_rpc_status(error)
        super().__init__(Code.INVALID_ARGUMENT, status.message, status.details)
        self.error = error


class _StrictCodec:
    """One of connect-python's codecs, whose decoding failure is the gateway's
    MALFORMED_REQUEST rather than a bare parser exception (UNKNOWN)."""

    def __init__(self, inner: _codec.Codec[Any, Any]) -> None:
        self.inner = inner

    def name(self) -> str:
        return self.inner.name()

    def encode(self, message: Any) -> bytes:
        return self.inner.encode(message)

    def decode(self, data: bytes | bytearray, message: Any) -> Any:
        try:
            return self.inner.decode(data, message)
        except Exception as exc:  # DecodeError, ParseError...: the bytes are bad
            # A JSON parser's message lists the message's every field: quoted, bounded.
            raise _refused(Malformed(echo(str(exc), PROBLEM_LIMIT)).error()) from None


class _BoundedGzip:
    """gzip for connect-python, whose own inflates whatever it is given: a small body can
    inflate to gigabytes. This one stops past the server's limit on a request, and
    compresses replies at level 1 (a vector's floats compress little; CPU is dear)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def name(self) -> str:
        return "gzip"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return gzip.compress(data, compresslevel=1)

    def decompress(self, data: bytes | bytearray | memoryview) -> bytes:
        limit = self._gate.max_request_bytes
        out = bytearray()
        rest = bytes(data)
        try:
            while rest:  # a gzip stream may hold several members
                inflater = zlib.decompressobj(wbits=31)
                out += inflater.decompress(rest, limit + 1 - len(out))
                if len(out) > limit or inflater.unconsumed_tail:
                    raise _refused(self._gate.too_large("the request, inflated,"))
                if not inflater.eof:
                    raise zlib.error("the gzip stream ends early")
                rest = inflater.unused_data
        except zlib.error as error:
            raise _refused(
                MalformedRequestError(f"the request is not valid gzip ({error})")
            ) from None
        return bytes(out)


def _refused(error: EmbedgateError) -> ConnectError:
    """``error``, for connect-python to answer, noted as the reason the call was refused
    (its access line, when no handler ran)."""
    call = _CALL.get()
    if call is not None and call.refused is None:
        call.refused = error
    if isinstance(error, MalformedRequestError):
        return _MalformedMessageError(error)
    return _as_connect_error(error)


def _strict_codecs() -> None:
    table = _codec._codecs
    for name, codec in list(table.items()):
        if not isinstance(codec, _StrictCodec):
            table[name] = cast(Any, _StrictCodec(codec))


def _header(scope: dict[str, Any], name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return b""


def _protocol(content_type: bytes) -> str:
    """The protocol of a request to the Connect application, by its content type."""
    if content_type.startswith(b"application/grpc-web"):
        return "grpc-web"
    if content_type.startswith(b"application/grpc"):
        return "grpc"
    return "connect"


def _bounded(receive: Any, scope: dict[str, Any], gate: Gate, call: _Call) -> Any:
    """``receive``, refusing a body larger than the server reads: at once when its
    declared length is, else as soon as what came is. The refusal is raised where
    connect-python reads the body, which answers it as the error it is."""
    meter = BodyMeter(gate, _header(scope, b"content-length"))
    if meter.over:
        call.refused = gate.too_large()

    async def bounded() -> Any:
        if call.refused is None:
            message = await receive()
            if message["type"] != "http.request" or meter.took(message.get("body", b"")):
                return message
            call.refused = gate.too_large()
        raise _as_connect_error(call.refused)

    return bounded


def _context(ctx: RequestContext[Any, Any]) -> DoorContext:
    timeout_ms = ctx.timeout_ms()
    return DoorContext(
        list(ctx.request_headers().allitems()),
        None if timeout_ms is None else max(0.0, timeout_ms / 1000),
    )


def _carry(headers: Headers, metadata: dict[str, str]) -> None:
    """The call's request id and trace id into ``headers``."""
    for key, value in echoed(metadata).items():
        headers[key] = value


async def _parsed(requests: AsyncIterator[Req], gate: Gate) -> AsyncIterator[Req]:
    """A request stream whose message that does not parse, or is larger than the server
    reads, ends it as the gateway's own error (MALFORMED_REQUEST, REQUEST_TOO_LARGE),
    which the servicer answers as on the gRPC port; a caller that goes away cancels it."""
    try:
        async for request in requests:
            yield request
    except _MalformedMessageError as bad:
        raise bad.error from None
    except ConnectError as error:
        if error.code is Code.CANCELED:  # the caller went away: as gRPC ends such a call
            raise asyncio.CancelledError from None
        if error.code is not Code.RESOURCE_EXHAUSTED:  # connect-python's size check
            raise
        raise gate.too_large("a request of the stream") from None


class _Handlers:
    """The methods connect-python's application calls, each onto the gRPC servicer."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._service = gate.service

    async def _unary(
        self,
        method: str,
        rpc: Callable[[Req, Any], Awaitable[Res]],
        request: Req,
        ctx: RequestContext[Any, Any],
    ) -> Res:
        _taken()
        context = _context(ctx)
        with _ended_as_connect(ctx.response_headers()):
            async with asyncio.timeout_at(context.deadline):
                with admitted(self._gate, method, context):
                    response = await rpc(request, context)
        _carry(ctx.response_headers(), context.trailing)
        return response

    async def _stream(
        self,
        method: str,
        replies_of: Callable[[Any], AsyncIterator[Res]],  # an async generator's
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[Res]:
        _taken()
        context = _context(ctx)
        with (
            _ended_as_connect(ctx.response_trailers()),
            admitted(self._gate, method, context, stream=True),
        ):
            async with aclosing(cast(AsyncGenerator[Res, None], replies_of(context))) as replies:
                while True:
                    # The deadline bounds the wait for each reply, not the caller's
                    # reading of it (a timeout across a yield would cancel the server's
                    # own writing instead).
                    async with asyncio.timeout_at(context.deadline):
                        try:
                            reply = await anext(replies)
                        except StopAsyncIteration:
                            break
                    yield reply
        _carry(ctx.response_trailers(), context.trailing)

    async def embed(
        self, request: pb.EmbedRequest, ctx: RequestContext[Any, Any]
    ) -> pb.EmbedResponse:
        return await self._unary("Embed", self._service.Embed, request, ctx)

    async def rerank(
        self, request: pb.RerankRequest, ctx: RequestContext[Any, Any]
    ) -> pb.RerankResponse:
        return await self._unary("Rerank", self._service.Rerank, request, ctx)

    async def list_models(
        self, request: pb.ListModelsRequest, ctx: RequestContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return await self._unary("ListModels", self._service.ListModels, request, ctx)

    def stream_embed(
        self, request: pb.StreamEmbedRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.StreamEmbedResponse]:
        return self._stream(
            "StreamEmbed", lambda context: self._service.StreamEmbed(request, context), ctx
        )

    def embed_pipeline(
        self, requests: AsyncIterator[pb.EmbedPipelineRequest], ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.EmbedPipelineResponse]:
        return self._stream(
            "EmbedPipeline",
            lambda context: self._service.EmbedPipeline(_parsed(requests, self._gate), context),
            ctx,
        )


def _taken() -> None:
    call = _CALL.get()
    if call is not None:
        call.served = True


class ConnectDoor:
    """An ASGI application: connect-python's, for the service's path, with the request's
    protocol named for the access line, a body larger than the server reads refused (but
    for ``EmbedPipeline``'s stream of requests, whose each message is bounded instead),
    and a refusal made before any handler runs given its access line too."""

    def __init__(self, gate: Gate) -> None:
        _strict_codecs()
        self._gate = gate
        self._app = EmbeddingServiceASGIApplication(
            _Handlers(gate),
            read_max_bytes=gate.max_request_bytes,
            compressions=[_BoundedGzip(gate)],
        )
        self.path = self._app.path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        call = _Call()
        door = DOOR.set(_protocol(_header(scope, b"content-type")))
        taken = _CALL.set(call)
        method = scope["path"].rsplit("/", 1)[-1]
        if method != "EmbedPipeline":
            receive = _bounded(receive, scope, self._gate, call)
        try:
            await self._app(scope, receive, send)
            if call.refused is not None and not call.served:
                refused_line(method, self._gate.metrics, call.refused)
        except ConnectError as error:
            # What connect-python raises once a stream's caller is gone: no one to tell.
            if error.code is not Code.CANCELED:
                raise
        finally:
            _CALL.reset(taken)
            DOOR.reset(door)
