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
"""

from __future__ import annotations

import asyncio
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

from embedgate.server.edge.access import DOOR, REQUEST_ID_HEADER
from embedgate.server.edge.doors import (
    DoorAbortedError,
    DoorContext,
    admitted,
    refused_line,
)
from embedgate.server.edge.guard import Guard
from embedgate.server.edge.service import EmbeddingService
from embedgate.server.edge.status import to_rpc_status
from embedgate.server.errors import MalformedRequestError
from embedgate.server.metrics import Metrics
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1.embedding_service_connect import EmbeddingServiceASGIApplication

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
    """One HTTP request to the Connect application: whether a handler took it, and the
    body that did not parse, if any."""

    served: bool = False
    malformed: MalformedRequestError | None = None


_CALL: ContextVar[_Call | None] = ContextVar("embedgate_connect_call", default=None)


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
            problem = str(exc)
            error = MalformedRequestError(
                "the request does not parse as the message this method takes "
                f"({problem[:300]}{'...' if len(problem) > 300 else ''})"
            )
            call = _CALL.get()
            if call is not None and call.malformed is None:
                call.malformed = error
            raise _MalformedMessageError(error) from None


def _strict_codecs() -> None:
    table = _codec._codecs
    for name, codec in list(table.items()):
        if not isinstance(codec, _StrictCodec):
            table[name] = cast(Any, _StrictCodec(codec))


def _protocol(scope: dict[str, Any]) -> str:
    """The protocol of a request to the Connect application, by its content type."""
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            if value.startswith(b"application/grpc-web"):
                return "grpc-web"
            if value.startswith(b"application/grpc"):
                return "grpc"
            break
    return "connect"


def _context(ctx: RequestContext[Any, Any]) -> DoorContext:
    timeout_ms = ctx.timeout_ms()
    return DoorContext(
        list(ctx.request_headers().allitems()),
        None if timeout_ms is None else max(0.0, timeout_ms / 1000),
    )


def _carry(headers: Headers, metadata: dict[str, str]) -> None:
    given = metadata.get(REQUEST_ID_HEADER)
    if given:
        headers[REQUEST_ID_HEADER] = given


async def _parsed(requests: AsyncIterator[Req]) -> AsyncIterator[Req]:
    """A request stream whose message that does not parse ends it as the gRPC port's
    does (the servicer answers MALFORMED_REQUEST)."""
    try:
        async for request in requests:
            yield request
    except _MalformedMessageError as bad:
        raise bad.error from None


class _Handlers:
    """The methods connect-python's application calls, each onto the gRPC servicer."""

    def __init__(self, service: EmbeddingService, guard: Guard, metrics: Metrics) -> None:
        self._service = service
        self._guard = guard
        self._metrics = metrics

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
                with admitted(self._guard, self._metrics, method, context):
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
            admitted(self._guard, self._metrics, method, context, stream=True),
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
            lambda context: self._service.EmbedPipeline(_parsed(requests), context),
            ctx,
        )


def _taken() -> None:
    call = _CALL.get()
    if call is not None:
        call.served = True


class ConnectDoor:
    """An ASGI application: connect-python's, for the service's path, with the request's
    protocol named for the access line, and a refusal connect-python makes before any
    handler runs (a body that does not parse) given its access line too."""

    def __init__(
        self,
        service: EmbeddingService,
        guard: Guard,
        metrics: Metrics,
        max_request_bytes: int,
    ) -> None:
        _strict_codecs()
        self._metrics = metrics
        self._app = EmbeddingServiceASGIApplication(
            _Handlers(service, guard, metrics), read_max_bytes=max_request_bytes
        )
        self.path = self._app.path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        call = _Call()
        door = DOOR.set(_protocol(scope))
        taken = _CALL.set(call)
        try:
            await self._app(scope, receive, send)
            if call.malformed is not None and not call.served:
                method = scope["path"].rsplit("/", 1)[-1]
                refused_line(method, self._metrics, call.malformed)
        finally:
            _CALL.reset(taken)
            DOOR.reset(door)
