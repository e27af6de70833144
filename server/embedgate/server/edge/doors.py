"""What the gRPC service asks of a call's context, for calls that come through another
door (the OpenAI API, a rerank API, Connect and gRPC-Web): the same service, the same
checks, limits and access lines, with the door's own protocol around them.

The service reads the caller's metadata and deadline from its context, sets trailing
metadata, and ends a failed call with ``abort``; ``DoorContext`` answers those from an
HTTP request, and its ``abort`` raises ``DoorAbortedError``, which carries the status the
service built (code, message, ``google.rpc`` details) for the door to render. ``Gate``
is what every door hands its calls to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from embedgate.server.edge.access import REQUEST_ID_HEADER, Access
from embedgate.server.edge.guard import Guard
from embedgate.server.edge.service import EmbeddingService
from embedgate.server.edge.status import grpc_code, to_rpc_status, trailing_metadata
from embedgate.server.errors import EmbedgateError, RequestTooLargeError
from embedgate.server.metrics import Metrics
from embedgate.server.tracing import TRACE_ID_HEADER

_DETAILS_KEY = "grpc-status-details-bin"


class DoorAbortedError(Exception):
    """A call the service ended with a status other than OK."""

    def __init__(
        self, code: grpc.StatusCode, message: str, metadata: Sequence[tuple[str, Any]]
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status_pb2.Status()
        self.metadata: dict[str, str] = {}
        for key, value in metadata:
            if key == _DETAILS_KEY and isinstance(value, bytes):
                try:
                    self.status.ParseFromString(value)
                except DecodeError:  # the service built it; not expected
                    self.status = status_pb2.Status()
            elif isinstance(value, str):
                self.metadata[key] = value

    def _detail(self, kind: Any) -> Any:
        for detail in self.status.details:
            if detail.Is(kind.DESCRIPTOR):
                found = kind()
                detail.Unpack(found)
                return found
        return None

    @property
    def reason(self) -> str:
        info = self._detail(error_details_pb2.ErrorInfo)
        return info.reason if info is not None else self.code.name

    @property
    def fields(self) -> list[str]:
        """The request fields the status blames, as the gRPC error names them."""
        bad = self._detail(error_details_pb2.BadRequest)
        return [] if bad is None else [v.field for v in bad.field_violations]

    @property
    def retry_after_s(self) -> float | None:
        retry = self._detail(error_details_pb2.RetryInfo)
        if retry is None:
            return None
        return float(retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9)


class DoorContext:
    """The part of ``grpc.aio.ServicerContext`` the service uses, for one HTTP call:
    its headers as the call's metadata (keys lower-cased, as gRPC's are) and its
    deadline (None: the server's default applies)."""

    def __init__(self, headers: Sequence[tuple[str, str]], timeout_s: float | None = None) -> None:
        self._metadata = tuple(headers)
        # When the call must end, on the loop's clock (None: the server's default applies).
        self.deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        self.trailing: dict[str, str] = {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing.update((key, value) for key, value in metadata if isinstance(value, str))

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> NoReturn:
        raise DoorAbortedError(code, details, trailing_metadata)


def refusal(error: EmbedgateError) -> DoorAbortedError:
    """An error found by the door itself, as the service would have ended the call."""
    status = to_rpc_status(error)
    return DoorAbortedError(grpc_code(error), status.message, trailing_metadata(status))


def metadata_of(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """HTTP headers as gRPC metadata: lower-case keys, text values."""
    return [(key.decode("latin-1").lower(), value.decode("latin-1")) for key, value in raw]


# What an RPC sends back in trailing metadata that an HTTP door sends as headers.
ECHOED = (REQUEST_ID_HEADER, TRACE_ID_HEADER)


def echoed(metadata: Mapping[str, str]) -> dict[str, str]:
    """The call's request id and trace id, as the response headers that carry them."""
    return {key: metadata[key] for key in ECHOED if metadata.get(key)}


@dataclass(frozen=True, slots=True)
class Gate:
    """What every door hands its calls to: the service, the guard that admits them as
    it admits RPCs, the metrics their access lines count in, and the largest request body
    the server reads (``server.max_request_bytes``, gRPC's limit on a message)."""

    service: EmbeddingService
    guard: Guard
    metrics: Metrics
    max_request_bytes: int

    def too_large(self, what: str = "the request body") -> RequestTooLargeError:
        limit = self.max_request_bytes
        return RequestTooLargeError(
            f"{what} is larger than this server reads: {limit} bytes (server.max_request_bytes)",
            metadata={"max_request_bytes": str(limit)},
        )


class BodyMeter:
    """A request body's bytes against the gate's limit as they come: ``over`` at once
    when its declared length (``Content-Length``) is above it, else as soon as what
    came is."""

    __slots__ = ("_limit", "_size", "over")

    def __init__(self, gate: Gate, declared: str | bytes) -> None:
        self._limit = gate.max_request_bytes
        self._size = 0
        self.over = declared.isdigit() and int(declared) > self._limit

    def took(self, chunk: bytes) -> bool:
        """Count ``chunk``; whether the body is still within the limit."""
        self._size += len(chunk)
        self.over = self.over or self._size > self._limit
        return not self.over


def refused_line(method: str, metrics: Metrics, error: EmbedgateError) -> None:
    """The access line of a call refused before the service saw it."""
    access = Access(method, metrics)
    access.fields["reason"] = error.reason
    access.emit(grpc_code(error))


@contextmanager
def admitted(
    gate: Gate, method: str, context: DoorContext, *, stream: bool = False
) -> Iterator[None]:
    """The call admitted as an RPC would be (token, scopes, cap) for the block's time. A
    refusal gets its access line here (the service writes every other one) and is raised
    as ``DoorAbortedError``."""
    with ExitStack() as stack:
        try:
            stack.enter_context(
                gate.guard.admitted(method, context.invocation_metadata(), stream=stream)
            )
        except EmbedgateError as refused:
            refused_line(method, gate.metrics, refused)
            raise refusal(refused) from None
        yield
