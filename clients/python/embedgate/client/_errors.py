"""Typed errors carrying the status code and the unpacked ``google.rpc`` details.

::

    EmbedgateError
    ├── InvalidArgumentError      INVALID_ARGUMENT (field_violations says which fields)
    ├── NotFoundError             NOT_FOUND (an unknown model)
    ├── ResourceExhaustedError    RESOURCE_EXHAUSTED (retry_delay when the server said)
    ├── FailedPreconditionError   FAILED_PRECONDITION
    ├── UnauthenticatedError      UNAUTHENTICATED
    ├── PermissionDeniedError     PERMISSION_DENIED
    ├── DeadlineExceededError     DEADLINE_EXCEEDED
    ├── UnavailableError          UNAVAILABLE
    ├── RequestCancelledError     CANCELLED
    └── InternalError             INTERNAL and anything else
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field the server rejected: its path (``inputs[2].image.data``), why, and a
    stable reason."""

    field: str
    description: str
    reason: str = ""


class EmbedgateError(Exception):
    """A call failed. ``code`` is the gRPC status; the rest comes from its details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
        details: tuple[Message, ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = field_violations
        self.retry_delay = retry_delay
        self.details = details

    @property
    def input_index(self) -> int | None:
        """The input this error concerns, when the server named one."""
        value = self.metadata.get("input_index")
        return int(value) if value is not None and value.isdigit() else None


class InvalidArgumentError(EmbedgateError): ...


class NotFoundError(EmbedgateError): ...


class ResourceExhaustedError(EmbedgateError): ...


class FailedPreconditionError(EmbedgateError): ...


class UnauthenticatedError(EmbedgateError): ...


class PermissionDeniedError(EmbedgateError): ...


class DeadlineExceededError(EmbedgateError): ...


class UnavailableError(EmbedgateError): ...


class RequestCancelledError(EmbedgateError): ...


class InternalError(EmbedgateError): ...


_BY_CODE: dict[grpc.StatusCode, type[EmbedgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(status: status_pb2.Status) -> EmbedgateError:
    """Build the typed error for a ``google.rpc.Status`` (as StreamEmbed sends per input)."""
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    unpacked: list[Message] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            unpacked.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(
                FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
            )
            unpacked.append(bad)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
            unpacked.append(retry)
    cls = _BY_CODE.get(code, InternalError)
    return cls(
        code,
        status.message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
        retry_delay=retry_delay,
        details=tuple(unpacked),
    )


def error_from_rpc(error: grpc.RpcError) -> EmbedgateError:
    """Build the typed error for a failed call, unpacking its status details."""
    call = error if isinstance(error, grpc.Call) else None
    code: grpc.StatusCode = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    message: str = (call.details() if call is not None else None) or str(error)
    trailers = call.trailing_metadata() if call is not None else None
    return _from_parts(code, message, trailers)


def error_from_aio(error: grpc.aio.AioRpcError) -> EmbedgateError:
    return _from_parts(error.code(), error.details() or "", error.trailing_metadata())


def _from_parts(code: grpc.StatusCode, message: str, trailers: object) -> EmbedgateError:
    for key, value in trailers or ():  # type: ignore[attr-defined]
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return error_from_status(status)
    return _BY_CODE.get(code, InternalError)(code, message)
