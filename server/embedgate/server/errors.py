"""The gateway's one error tree. The edge maps each class to a gRPC status once.

::

    EmbedgateError                 (reason: a stable UPPER_SNAKE string)
    ├── InvalidRequestError        INVALID_ARGUMENT, with field violations
    ├── RejectedError              INVALID_ARGUMENT   problems by position, before a door
    │                                                 turns them into field violations
    ├── MalformedRequestError      INVALID_ARGUMENT   bytes that are not the request message
    ├── ModelNotFoundError         NOT_FOUND
    ├── ModelUnavailableError      UNAVAILABLE
    ├── DeadlineExceededError      DEADLINE_EXCEEDED
    ├── InternalError              INTERNAL
    ├── UnauthenticatedError       UNAUTHENTICATED    no bearer token, or an unknown one
    ├── PermissionDeniedError      PERMISSION_DENIED  the token may not use that model
    ├── OverloadedError            RESOURCE_EXHAUSTED the server is at its cap of RPCs
    ├── RequestTooLargeError       RESOURCE_EXHAUSTED an HTTP request body over the server's
    │                                                 max_request_bytes
    ├── NoDeploymentError          UNAVAILABLE        every deployment of the model is out
    ├── QuotaExhaustedError        RESOURCE_EXHAUSTED no vendor quota has room within the
    │   │                                             call's deadline (QuotaFailure says whose)
    │   └── CallerQuotaExceededError RESOURCE_EXHAUSTED the caller spent one of its own
    │                                                 limits (QuotaFailure says which)
    └── VendorError                a vendor call failed for good (vendor, HTTP status, the
        │                          vendor's own code, message and request id in metadata)
        ├── VendorRejectedError    INVALID_ARGUMENT   the vendor said 400/413/422
        ├── VendorNotFoundError    NOT_FOUND          404: the vendor has no such model/path
        ├── VendorAuthError        FAILED_PRECONDITION  401/403: the gateway's key, not the
        │                                              caller's, so never UNAUTHENTICATED
        ├── VendorRateLimitedError RESOURCE_EXHAUSTED 429, with the wait the vendor asked for
        ├── VendorUnavailableError UNAVAILABLE        5xx, 408, connection errors, timeouts
        ├── VendorBadReplyError    UNAVAILABLE        a reply that breaks the dialect
        └── VendorFailedError      UNKNOWN            any other status

Errors are values: made once, never changed. An error that belongs to one input carries
its position (``input_index``; ``with_input`` makes the copy that says so), so the
caller is told which input failed. ``unexpected`` turns anything else into the
internal error, once. A value the caller sent is quoted in a message only
through ``echo``, cut to a bounded length, so no request can make its own error too big
to deliver.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Self

# How much of a caller's own value (a model name, a media type, an id) an error quotes.
ECHO_LIMIT = 128


def echo(value: str, limit: int = ECHO_LIMIT) -> str:
    """``value`` quoted for an error message or its metadata: as is when short, else its
    first ``limit`` characters marked as cut, with the full length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…[cut: {len(value)} characters]"


class Reason(enum.StrEnum):
    """Every reason a caller can be given (``ErrorInfo.reason``, a violation's reason):
    stable UPPER_SNAKE strings, listed in docs/errors.md (a test pins the two together)."""

    # A request that breaks a rule (INVALID_ARGUMENT), as violations' reasons.
    MISSING_FIELD = "MISSING_FIELD"
    EMPTY_TEXT = "EMPTY_TEXT"
    INVALID_IMAGE = "INVALID_IMAGE"
    INVALID_IMAGE_URI = "INVALID_IMAGE_URI"
    EMPTY_VIDEO = "EMPTY_VIDEO"
    UNSUPPORTED_MODALITY = "UNSUPPORTED_MODALITY"
    UNSUPPORTED_DIMENSIONS = "UNSUPPORTED_DIMENSIONS"
    UNSUPPORTED_OUTPUT_TYPE = "UNSUPPORTED_OUTPUT_TYPE"
    INSTRUCTION_NOT_SUPPORTED = "INSTRUCTION_NOT_SUPPORTED"
    TOO_MANY_INPUTS = "TOO_MANY_INPUTS"
    INPUT_TOO_LONG = "INPUT_TOO_LONG"
    FRAME_COUNT_OUT_OF_RANGE = "FRAME_COUNT_OUT_OF_RANGE"
    INVALID_TOP_N = "INVALID_TOP_N"
    CONFLICTING_FIELDS = "CONFLICTING_FIELDS"
    RERANK_NOT_SUPPORTED = "RERANK_NOT_SUPPORTED"
    EMBED_NOT_SUPPORTED = "EMBED_NOT_SUPPORTED"
    DUPLICATE_CORRELATION_ID = "DUPLICATE_CORRELATION_ID"
    INVALID_REQUEST_ID = "INVALID_REQUEST_ID"
    # Violations of several kinds at once.
    INVALID_REQUEST = "INVALID_REQUEST"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    # The model, the caller, the server.
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    NO_DEPLOYMENT_AVAILABLE = "NO_DEPLOYMENT_AVAILABLE"
    MISSING_TOKEN = "MISSING_TOKEN"  # noqa: S105 - a reason, not a secret
    INVALID_TOKEN = "INVALID_TOKEN"  # noqa: S105 - a reason, not a secret
    MODEL_NOT_PERMITTED = "MODEL_NOT_PERMITTED"
    OVERLOADED = "OVERLOADED"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    QUOTA_EXHAUSTED = "QUOTA_EXHAUSTED"
    CALLER_QUOTA_EXCEEDED = "CALLER_QUOTA_EXCEEDED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # The vendor.
    VENDOR_REJECTED_REQUEST = "VENDOR_REJECTED_REQUEST"
    VENDOR_NOT_FOUND = "VENDOR_NOT_FOUND"
    VENDOR_AUTH_FAILED = "VENDOR_AUTH_FAILED"
    VENDOR_RATE_LIMITED = "VENDOR_RATE_LIMITED"
    VENDOR_UNAVAILABLE = "VENDOR_UNAVAILABLE"
    VENDOR_BAD_REPLY = "VENDOR_BAD_REPLY"
    VENDOR_ERROR_IN_REPLY = "VENDOR_ERROR_IN_REPLY"
    VENDOR_FAILED = "VENDOR_FAILED"


@dataclass(frozen=True, slots=True)
class Violation:
    """One thing wrong with a request: where (a field path such as
    ``inputs[2].image.data``), what, and a stable reason; ``index`` is the position of
    the input it concerns (None: the request as a whole), which orders violations."""

    field: str
    description: str
    reason: Reason
    index: int | None = None


class Part(enum.StrEnum):
    """The part of a request a ``Problem`` concerns. Routing and the providers know
    inputs by position only; a door turns a part into a field path, because only it
    knows which field of its request the inputs came in (``inputs``, ``documents``...)."""

    CONTENT = "content"  # the input itself: its image, its video...
    TEXT = "text"  # its text (of a text input, or of a text+image pair)
    FRAMES = "frames"  # a video's list of frames
    INPUTS = "inputs"  # the list of inputs as a whole (how many there are)
    QUERY = "query"  # a rerank's query
    MODEL = "model"
    DIMENSIONS = "dimensions"
    INSTRUCTION = "instruction"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a request, by position: the input at ``index`` (None for
    a part of the request as a whole), the part at fault, what, and a stable reason."""

    part: Part
    description: str
    reason: Reason
    index: int | None = None


def shared_reason(reasons: Iterable[Reason]) -> Reason:
    """The reason of a request wrong in several ways: theirs when they all agree, else
    the general one."""
    distinct = set(reasons)
    return distinct.pop() if len(distinct) == 1 else Reason.INVALID_REQUEST


class EmbedgateError(Exception):
    """Base of every error the gateway reports to a caller. A value: never changed once
    made (``with_input`` makes a copy)."""

    reason: Reason = Reason.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: Mapping[str, str] | None = None,
        input_index: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).reason
        # When trying again may work (a vendor's Retry-After, a breaker's next probe),
        # told to the caller as RetryInfo.
        self.retry_after_s = retry_after_s
        details = dict(metadata or {})
        if input_index is not None:
            details["input_index"] = str(input_index)
        self.metadata: Mapping[str, str] = MappingProxyType(details)
        self.input_index = input_index

    def fields(self) -> dict[str, Any]:
        """What the constructor takes to make this error again (``with_input``)."""
        return {
            "message": self.message,
            "reason": self.reason,
            "metadata": self.metadata,
            "retry_after_s": self.retry_after_s,
        }

    def with_input(self, index: int) -> Self:
        """A copy of this error that says it happened on input ``index``: callers whose
        inputs shared a failed batch each get their own."""
        fields = self.fields()
        fields["metadata"] = {k: v for k, v in fields["metadata"].items() if k != "input_index"}
        twin = type(self)(**fields, input_index=index)
        twin.__cause__ = self.__cause__
        return twin

    def __str__(self) -> str:
        if self.input_index is not None and not self.message.startswith("inputs["):
            return f"inputs[{self.input_index}]: {self.message}"
        return self.message


def unexpected(error: BaseException) -> EmbedgateError:
    """``error`` as the error a caller is given: itself when it is one of the gateway's,
    else an internal error that names only its type (its text may hold a payload or a
    setting) and keeps it as its cause, for the log."""
    if isinstance(error, EmbedgateError):
        return error
    internal = InternalError(f"internal error ({type(error).__name__})")
    internal.__cause__ = error
    return internal


class InvalidRequestError(EmbedgateError):
    """The request is wrong; every violation found is listed at once."""

    reason = Reason.INVALID_REQUEST

    def __init__(
        self,
        violations: Sequence[Violation],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not violations:
            raise ValueError("an InvalidRequestError needs at least one violation")
        self.violations = tuple(violations)
        first = self.violations[0]
        summary = f"{first.field}: {first.description}"
        if len(self.violations) > 1:
            summary += f" (and {len(self.violations) - 1} more violation(s))"
        super().__init__(
            summary,
            reason=shared_reason(v.reason for v in self.violations),
            metadata=metadata,
        )

    def fields(self) -> dict[str, Any]:
        return {"violations": self.violations, "metadata": self.metadata}


class RejectedError(EmbedgateError):
    """What routing found wrong with a request, every problem at once, by position. A
    door turns it into an ``InvalidRequestError`` with the field paths of its request."""

    reason = Reason.INVALID_REQUEST

    def __init__(self, problems: Sequence[Problem], *, model: str) -> None:
        if not problems:
            raise ValueError("a RejectedError needs at least one problem")
        self.problems = tuple(problems)
        self.model = model
        first = self.problems[0]
        super().__init__(
            f"{first.part.value}: {first.description}",
            reason=shared_reason(problem.reason for problem in self.problems),
            metadata={"model": model},
        )

    def fields(self) -> dict[str, Any]:
        return {"problems": self.problems, "model": self.model}


class MalformedRequestError(EmbedgateError):
    """The bytes of a request message do not parse as the message the method takes."""

    reason = Reason.MALFORMED_REQUEST


class ModelNotFoundError(EmbedgateError):
    reason = Reason.MODEL_NOT_FOUND


class ModelUnavailableError(EmbedgateError):
    reason = Reason.MODEL_UNAVAILABLE


class DeadlineExceededError(EmbedgateError):
    reason = Reason.DEADLINE_EXCEEDED


class InternalError(EmbedgateError):
    reason = Reason.INTERNAL_ERROR


class UnauthenticatedError(EmbedgateError):
    reason = Reason.INVALID_TOKEN


class PermissionDeniedError(EmbedgateError):
    reason = Reason.MODEL_NOT_PERMITTED


class OverloadedError(EmbedgateError):
    reason = Reason.OVERLOADED


class RequestTooLargeError(EmbedgateError):
    """A request body larger than the server reads (gRPC's own limit on a message is
    RESOURCE_EXHAUSTED too)."""

    reason = Reason.REQUEST_TOO_LARGE


class NoDeploymentError(EmbedgateError):
    """Every deployment of a model is out of service (breakers open, keys refused, or
    waiting out a vendor's Retry-After): the call fails at once, saying when to retry."""

    reason = Reason.NO_DEPLOYMENT_AVAILABLE


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One quota that had no room: whose (``deployment:scnet-a``), and which limit."""

    subject: str
    description: str


class QuotaExhaustedError(EmbedgateError):
    """No vendor quota of the model has room for the request within the call's deadline:
    the call fails at once, saying when there will be room (``retry_after_s``) and which
    deployments' limits are spent (``violations``, told as ``QuotaFailure``)."""

    reason = Reason.QUOTA_EXHAUSTED

    def __init__(
        self, message: str, *, violations: Sequence[QuotaViolation] = (), **fields: Any
    ) -> None:
        super().__init__(message, **fields)
        self.violations = tuple(violations)

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "violations": self.violations}


class CallerQuotaExceededError(QuotaExhaustedError):
    """The caller has spent one of its own limits (``rate_limit``, ``input_limit``,
    ``token_limit``): refused before any work, saying when there will be room."""

    reason = Reason.CALLER_QUOTA_EXCEEDED


class VendorError(EmbedgateError):
    """A vendor call failed for good (after any retries).

    ``metadata`` carries what the vendor said: ``vendor``, ``http_status``,
    ``vendor_code``, ``vendor_message``, ``vendor_request_id`` (where known). Never a
    key, never a payload.
    """

    reason = Reason.VENDOR_FAILED


class VendorRejectedError(VendorError):
    reason = Reason.VENDOR_REJECTED_REQUEST


class VendorNotFoundError(VendorError):
    reason = Reason.VENDOR_NOT_FOUND


class VendorAuthError(VendorError):
    reason = Reason.VENDOR_AUTH_FAILED


class VendorRateLimitedError(VendorError):
    reason = Reason.VENDOR_RATE_LIMITED


class VendorUnavailableError(VendorError):
    reason = Reason.VENDOR_UNAVAILABLE


class VendorBadReplyError(VendorError):
    reason = Reason.VENDOR_BAD_REPLY


class VendorFailedError(VendorError):
    reason = Reason.VENDOR_FAILED
