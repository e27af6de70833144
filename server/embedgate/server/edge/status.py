"""Domain errors → gRPC status with ``google.rpc`` details. The one mapping table.

Every status fits in the caller's trailers whatever the request was: gRPC clients refuse
trailers over 8 KiB (``grpc-message`` is percent-encoded, the details base64-encoded), so
the message, each metadata value and each violation are cut to a byte budget, and
violations beyond the budget are counted instead of listed.
"""

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
    MalformedRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    NoDeploymentError,
    OverloadedError,
    PermissionDeniedError,
    QuotaExhaustedError,
    RejectedError,
    RequestTooLargeError,
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
    RejectedError: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelUnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NoDeploymentError: grpc.StatusCode.UNAVAILABLE,
    QuotaExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
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

# Byte budgets (UTF-8). Worst case on the wire: the message percent-encoded (x3) once as
# grpc-message and once inside the details, the details base64-encoded (x4/3): about
# 5 KiB in all, well under the 8 KiB clients accept.
MAX_MESSAGE_BYTES = 320
MAX_METADATA_VALUE_BYTES = 200
MAX_DESCRIPTION_BYTES = 300
MAX_VIOLATIONS_BYTES = 1800


def grpc_code(error: EmbedgateError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def bounded(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, marked as cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    marker = f"…[cut: {len(text)} characters]"
    keep = raw[: max(0, limit - len(marker.encode()))].decode("utf-8", "ignore")
    return keep + marker


def _field_violations(
    error: InvalidRequestError, metadata: dict[str, str]
) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The violations that fit the budget, in order; the rest are counted in
    ``metadata`` (``violations``, ``violations_listed``)."""
    listed: list[error_details_pb2.BadRequest.FieldViolation] = []
    used = 0
    for violation in error.violations:
        item = error_details_pb2.BadRequest.FieldViolation(
            field=bounded(violation.field, MAX_METADATA_VALUE_BYTES),
            description=bounded(violation.description, MAX_DESCRIPTION_BYTES),
            reason=violation.reason,
        )
        used += item.ByteSize() + 4  # the repeated field's tag and length
        if used > MAX_VIOLATIONS_BYTES:
            metadata["violations"] = str(len(error.violations))
            metadata["violations_listed"] = str(len(listed))
            break
        listed.append(item)
    return listed


def to_rpc_status(error: EmbedgateError, *, index: int | None = None) -> status_pb2.Status:
    """The ``google.rpc.Status`` for ``error``: code, message, ``ErrorInfo`` always,
    ``BadRequest`` for invalid requests. ``index`` names the input it concerns."""
    code = grpc_code(error)
    index = error.input_index if index is None else index
    message = error.message
    metadata = {
        key: bounded(value, MAX_METADATA_VALUE_BYTES) for key, value in error.metadata.items()
    }
    if index is not None:
        metadata["input_index"] = str(index)
        if not message.startswith("inputs["):
            message = f"inputs[{index}]: {message}"
    message = bounded(message, MAX_MESSAGE_BYTES)
    violations = (
        _field_violations(error, metadata) if isinstance(error, InvalidRequestError) else None
    )
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    ]
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=error.retry_after_s))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if violations is not None:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if isinstance(error, QuotaExhaustedError) and error.violations:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=bounded(v.subject, MAX_METADATA_VALUE_BYTES),
                    description=bounded(v.description, MAX_DESCRIPTION_BYTES),
                )
                for v in error.violations
            ]
        )
        details.append(_pack(quota))
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def trailing_metadata(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)
