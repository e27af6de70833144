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

An error that belongs to one input carries its position (``input_index``), so the
caller is told which input failed. A value the caller sent is quoted in a message only
through ``echo``, cut to a bounded length, so no request can make its own error too big
to deliver.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# How much of a caller's own value (a model name, a media type, an id) an error quotes.
ECHO_LIMIT = 128


def echo(value: str, limit: int = ECHO_LIMIT) -> str:
    """``value`` quoted for an error message or its metadata: as is when short, else its
    first ``limit`` characters marked as cut, with the full length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…[cut: {len(value)} characters]"


@dataclass(frozen=True, slots=True)
class Violation:
    """One thing wrong with a request: where (a field path such as
    ``inputs[2].image.data``), what, and a stable reason; ``index`` is the position of
    the input it concerns (None: the request as a whole), which orders violations."""

    field: str
    description: str
    reason: str
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
    reason: str
    index: int | None = None


class EmbedgateError(Exception):
    """Base of every error the gateway reports to a caller."""

    reason = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        input_index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.input_index = input_index

    def for_input(self, index: int) -> EmbedgateError:
        """Say that this error happened on input ``index`` (returns ``self``)."""
        self.input_index = index
        self.metadata.setdefault("input_index", str(index))
        return self

    def __str__(self) -> str:
        if self.input_index is not None and not self.message.startswith("inputs["):
            return f"inputs[{self.input_index}]: {self.message}"
        return self.message


class InvalidRequestError(EmbedgateError):
    """The request is wrong; every violation found is listed at once."""

    reason = "INVALID_REQUEST"

    def __init__(
        self,
        violations: Sequence[Violation],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not violations:
            raise ValueError("an InvalidRequestError needs at least one violation")
        self.violations = tuple(violations)
        reasons = {v.reason for v in self.violations}
        first = self.violations[0]
        summary = f"{first.field}: {first.description}"
        if len(self.violations) > 1:
            summary += f" (and {len(self.violations) - 1} more violation(s))"
        super().__init__(
            summary,
            # One shared reason when every violation agrees, else the general one.
            reason=reasons.pop() if len(reasons) == 1 else "INVALID_REQUEST",
            metadata=metadata,
        )


class RejectedError(EmbedgateError):
    """What routing found wrong with a request, every problem at once, by position. A
    door turns it into an ``InvalidRequestError`` with the field paths of its request."""

    reason = "INVALID_REQUEST"

    def __init__(self, problems: Sequence[Problem], *, model: str) -> None:
        if not problems:
            raise ValueError("a RejectedError needs at least one problem")
        self.problems = tuple(problems)
        self.model = model
        first = self.problems[0]
        reasons = {problem.reason for problem in self.problems}
        super().__init__(
            f"{first.part.value}: {first.description}",
            reason=reasons.pop() if len(reasons) == 1 else "INVALID_REQUEST",
            metadata={"model": model},
        )


class MalformedRequestError(EmbedgateError):
    """The bytes of a request message do not parse as the message the method takes."""

    reason = "MALFORMED_REQUEST"


class ModelNotFoundError(EmbedgateError):
    reason = "MODEL_NOT_FOUND"


class ModelUnavailableError(EmbedgateError):
    reason = "MODEL_UNAVAILABLE"


class DeadlineExceededError(EmbedgateError):
    reason = "DEADLINE_EXCEEDED"


class InternalError(EmbedgateError):
    reason = "INTERNAL_ERROR"


class UnauthenticatedError(EmbedgateError):
    reason = "UNAUTHENTICATED"


class PermissionDeniedError(EmbedgateError):
    reason = "MODEL_NOT_PERMITTED"


class OverloadedError(EmbedgateError):
    reason = "OVERLOADED"


class VendorError(EmbedgateError):
    """A vendor call failed for good (after any retries).

    ``metadata`` carries what the vendor said: ``vendor``, ``http_status``,
    ``vendor_code``, ``vendor_message``, ``vendor_request_id`` (where known). Never a
    key, never a payload.
    """

    reason = "VENDOR_FAILED"


class VendorRejectedError(VendorError):
    reason = "VENDOR_REJECTED_REQUEST"


class VendorNotFoundError(VendorError):
    reason = "VENDOR_NOT_FOUND"


class VendorAuthError(VendorError):
    reason = "VENDOR_AUTH_FAILED"


class VendorRateLimitedError(VendorError):
    reason = "VENDOR_RATE_LIMITED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        # How long the vendor asked us to wait (its Retry-After), told to the caller.
        self.retry_after_s = retry_after_s


class VendorUnavailableError(VendorError):
    reason = "VENDOR_UNAVAILABLE"


class VendorBadReplyError(VendorError):
    reason = "VENDOR_BAD_REPLY"


class VendorFailedError(VendorError):
    reason = "VENDOR_FAILED"
