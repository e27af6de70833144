"""Domain errors → gRPC status with ``google.rpc`` details. The one mapping table."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from embedgate.server.errors import (
    DeadlineExceededError,
    EmbedgateError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
    VendorAuthError,
    VendorBadReplyError,
    VendorError,
    VendorFailedError,
    VendorNotFoundError,
    VendorRateLimitedError,
    VendorRejectedError,
    VendorUnavailableError,
)

ERROR_DOMAIN = "embedgate"

# The most specific class wins: lookups walk each error's MRO.
_CODES: dict[type[EmbedgateError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelUnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    VendorRejectedError: grpc.StatusCode.INVALID_ARGUMENT,
    VendorNotFoundError: grpc.StatusCode.NOT_FOUND,
    # The gateway's own vendor key was refused: the caller can do nothing about it, and
    # UNAUTHENTICATED would wrongly point at the caller's credentials.
    VendorAuthError: grpc.StatusCode.FAILED_PRECONDITION,
    VendorRateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    VendorUnavailableError: grpc.StatusCode.UNAVAILABLE,
    VendorBadReplyError: grpc.StatusCode.UNAVAILABLE,
    VendorFailedError: grpc.StatusCode.UNKNOWN,
    VendorError: grpc.StatusCode.UNKNOWN,
    EmbedgateError: grpc.StatusCode.INTERNAL,
}

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def grpc_code(error: EmbedgateError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: EmbedgateError, *, index: int | None = None) -> status_pb2.Status:
    """The ``google.rpc.Status`` for ``error``: code, message, ``ErrorInfo`` always,
    ``BadRequest`` for invalid requests. ``index`` names the input it concerns."""
    code = grpc_code(error)
    index = error.input_index if index is None else index
    message = error.message
    metadata = dict(error.metadata)
    if index is not None:
        metadata["input_index"] = str(index)
        if not message.startswith("inputs["):
            message = f"inputs[{index}]: {message}"
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    ]
    if isinstance(error, VendorRateLimitedError) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=error.retry_after_s))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, InvalidRequestError):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description, reason=v.reason
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def trailing_metadata(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)
