"""What every RPC passes before it is served: request bytes that parse, the caller's
bearer token, and the cap on RPCs served at once. Health checks pass freely (their
service is registered with ``register_lenient``: parsing only), so probes work under load.

Bytes that do not parse as the method's request message are INVALID_ARGUMENT
(``MALFORMED_REQUEST``) and one access line, rather than grpc's UNKNOWN and a traceback
in the log for every such message: the deserializer hands back a ``Malformed`` marker
instead of raising, and the wrapped handler answers it.

An RPC over the cap is refused at once with RESOURCE_EXHAUSTED (the caller retries,
or its balancer picks another replica) rather than queued behind work it would wait
for. A token may be limited to some models: the servicer asks ``allowed_models``.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from embedgate.server.edge.access import Access, metadata_value
from embedgate.server.edge.status import grpc_code, to_rpc_status, trailing_metadata
from embedgate.server.errors import (
    EmbedgateError,
    MalformedRequestError,
    OverloadedError,
    PermissionDeniedError,
    Reason,
    UnauthenticatedError,
    echo,
)
from embedgate.server.metrics import Metrics

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Caller:
    """Who presented which token: its name (never the token) and the models it may use
    (None: every model)."""

    name: str
    models: frozenset[str] | None


_CALLER: ContextVar[Caller | None] = ContextVar("embedgate_caller", default=None)


def current_caller() -> Caller | None:
    """The caller whose token the RPC presented (None: the server has no auth)."""
    return _CALLER.get()


def check_model(model: str) -> None:
    """Refuse ``model`` when the RPC's token may not use it."""
    caller = _CALLER.get()
    if caller is None or caller.models is None or model in caller.models:
        return
    allowed = ", ".join(sorted(caller.models))
    raise PermissionDeniedError(
        f"token {caller.name!r} may not use model {echo(model)!r} (it may use: {allowed})",
        metadata={"model": echo(model), "token": caller.name},
    )


def allowed_models() -> frozenset[str] | None:
    """The models the RPC's token may use; None: every model."""
    caller = _CALLER.get()
    return None if caller is None else caller.models


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the deserializer returns for bytes that are not a request message."""

    problem: str

    def error(self) -> MalformedRequestError:
        return MalformedRequestError(
            f"the request does not parse as the message this method takes ({self.problem})"
        )


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, or whatever a parser raises: the bytes are bad
            return Malformed(str(exc))

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose malformed message raises ``MalformedRequestError``."""
    async for item in requests:
        if type(item) is Malformed:
            raise item.error()
        yield item


async def refuse(
    context: grpc.aio.ServicerContext[Any, Any],
    name: str,
    metrics: Metrics,
    error: EmbedgateError,
) -> None:
    """End an RPC that is not served, with its access line (raises, as abort does)."""
    access = Access(name, metrics)
    access.fields["reason"] = error.reason
    access.emit(grpc_code(error))
    status = to_rpc_status(error)
    await context.abort(grpc_code(error), status.message, trailing_metadata(status))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The accepted tokens, kept as digests; a presented token is compared to each in
    constant time."""

    def __init__(self, tokens: Mapping[str, Caller]) -> None:
        self._callers = [(_digest(token), caller) for token, caller in tokens.items()]

    def caller(self, metadata: Any) -> Caller:
        presented = metadata_value(metadata, "authorization")
        if presented is None or presented[: len(BEARER)].lower() != BEARER:
            raise UnauthenticatedError(
                "this server requires a bearer token: send metadata "
                "'authorization: Bearer <token>'",
                reason=Reason.MISSING_TOKEN,
            )
        digest = _digest(presented[len(BEARER) :].strip())
        found = None
        for known, caller in self._callers:  # no early exit: the same time for any token
            if hmac.compare_digest(digest, known):
                found = caller
        if found is None:
            raise UnauthenticatedError("the bearer token is not valid", reason=Reason.INVALID_TOKEN)
        return found


class Guard:
    """Wraps the handlers of the services it registers (see ``register``): cheaper per
    RPC than a server interceptor, which grpc.aio awaits on every call."""

    def __init__(self, metrics: Metrics, *, max_concurrent: int, tokens: Tokens | None) -> None:
        self._metrics = metrics
        self._max = max_concurrent
        self._tokens = tokens
        self._active = 0
        self._unary = 0

    @property
    def unary_active(self) -> int:
        """Unary RPCs being served now (a stream may stay open, idle, for hours)."""
        return self._unary

    def _admit(self, metadata: Any) -> None:
        """The caller's bearer token (it decides the models the call may use), then the
        cap on calls served at once; raises the refusal (an ``EmbedgateError``)."""
        if self._tokens is not None:
            try:
                _CALLER.set(self._tokens.caller(metadata))
            except UnauthenticatedError:
                self._metrics.rpcs_rejected.labels("unauthenticated").inc()
                raise
        if self._active >= self._max:
            self._metrics.rpcs_rejected.labels("overload").inc()
            raise OverloadedError(
                f"the server is serving its limit of {self._max} RPCs at once; retry with backoff",
                metadata={"max_concurrent_rpcs": str(self._max)},
            )

    @contextmanager
    def admitted(self, name: str, headers: Any, *, stream: bool = False) -> Iterator[None]:
        """The admission an RPC gets, for a call through another door (see ``_admit``),
        and its count among the calls in progress (a ``stream`` not among the unary ones)."""
        self._admit(headers)
        gauge = self._metrics.rpcs_in_flight.labels(name)
        unary = not stream
        self._active += 1
        self._unary += unary
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()
            self._unary -= unary
            self._active -= 1

    def register(
        self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server
    ) -> None:
        """Register ``servicer`` with ``server`` as the generated ``add_..._to_server``
        function would, each of its methods behind the guard."""
        add_to_server(servicer, _Registrar(server, self._wrap))

    def register_lenient(
        self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server
    ) -> None:
        """Register ``servicer`` with only malformed requests refused: no token, no cap,
        not counted (health checks)."""
        add_to_server(servicer, _Registrar(server, self._wrap_lenient))

    def _wrap_lenient(self, name: str, handler: Handler) -> Handler:
        """Unary methods, and server streams written with ``context.write`` (the shapes
        of grpc.health.v1's servicer)."""
        stream_writer = handler.unary_stream
        if handler.unary_unary is None and (
            stream_writer is None or inspect.isasyncgenfunction(stream_writer)
        ):
            raise ValueError(f"{name}: registered leniently only as unary or a stream writer")
        codec = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_unary: Any = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if type(request) is Malformed:
                    await refuse(context, name, self._metrics, request.error())
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **codec)
        inner_writer: Any = stream_writer

        async def writer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if type(request) is Malformed:
                await refuse(context, name, self._metrics, request.error())
            await inner_writer(request, context)

        return grpc.unary_stream_rpc_method_handler(writer, **codec)

    async def _enter(self, context: grpc.aio.ServicerContext[Any, Any], name: str) -> None:
        """Let the RPC in and count it, or end it with why not."""
        try:
            self._admit(context.invocation_metadata())
        except EmbedgateError as error:
            await refuse(context, name, self._metrics, error)
        self._active += 1

    def _wrap(self, name: str, handler: Handler) -> Handler:
        gauge = self._metrics.rpcs_in_flight.labels(name)
        codec = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }

        def leave() -> None:
            gauge.dec()
            self._active -= 1

        if handler.unary_unary is not None:
            inner_unary: Any = handler.unary_unary  # async under grpc.aio

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if type(request) is Malformed:
                    await refuse(context, name, self._metrics, request.error())
                if self._tokens is None and self._active < self._max:
                    self._active += 1  # the common case, without a coroutine
                else:
                    await self._enter(context, name)
                gauge.inc()
                self._unary += 1
                try:
                    return await inner_unary(request, context)
                finally:
                    self._unary -= 1
                    leave()

            return grpc.unary_unary_rpc_method_handler(unary, **codec)

        def streaming(inner: Any, streamed: bool) -> Callable[..., Any]:
            async def behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if streamed:
                    request = _checked(request)
                elif type(request) is Malformed:
                    await refuse(context, name, self._metrics, request.error())
                await self._enter(context, name)
                gauge.inc()
                try:
                    async for reply in inner(request, context):
                        yield reply
                except MalformedRequestError as error:  # a servicer that let it through
                    await refuse(context, name, self._metrics, error)
                finally:
                    leave()

            return behavior

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream, False), **codec
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                streaming(handler.stream_stream, True), **codec
            )
        raise ValueError(f"{name}: client-streaming methods are not guarded")


class _Registrar:
    """Stands in for the server in a generated ``add_..._to_server`` call: takes the
    method handlers it registers and registers wrapped ones instead."""

    def __init__(self, server: grpc.aio.Server, wrap: Callable[[str, Handler], Handler]) -> None:
        self._server = server
        self._wrap = wrap

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        """Ignored: the same methods come to ``add_registered_method_handlers``."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        wrapped = {name: self._wrap(name, handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)
