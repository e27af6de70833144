"""The error tree as values: made once and never changed, copied to name an input, the
unexpected turned into the internal error in one place, and one enum of reasons that is
the table callers read in docs/errors.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from embedgate.server import errors
from embedgate.server.errors import (
    EmbedgateError,
    InternalError,
    InvalidRequestError,
    Reason,
    VendorRateLimitedError,
    VendorUnavailableError,
    Violation,
    unexpected,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def test_with_input_makes_a_copy_and_leaves_the_original_alone() -> None:
    """Callers sharing a failed batch each get their own error naming their input; the
    shared one is not changed, and its metadata cannot be."""
    shared = VendorRateLimitedError(
        "rate limited", retry_after_s=2.5, metadata={"vendor": "openai"}
    )
    first, second = shared.with_input(0), shared.with_input(3)
    assert (shared.input_index, dict(shared.metadata)) == (None, {"vendor": "openai"})
    assert (first.input_index, second.input_index) == (0, 3)
    assert dict(second.metadata) == {"vendor": "openai", "input_index": "3"}
    assert type(second) is VendorRateLimitedError
    assert second.retry_after_s == 2.5
    assert str(second) == "inputs[3]: rate limited"
    assert second.with_input(1).metadata["input_index"] == "1"
    with pytest.raises(TypeError):
        shared.metadata["vendor"] = "changed"  # type: ignore[index]


def test_the_unexpected_becomes_one_internal_error_that_keeps_its_cause() -> None:
    """A gateway error passes as it is; anything else becomes INTERNAL_ERROR naming only
    its type (its text may hold a payload), with the original kept as its cause."""
    own = VendorUnavailableError("down")
    assert unexpected(own) is own
    cause = KeyError("secret payload")
    made = unexpected(cause)
    assert isinstance(made, InternalError)
    assert made.reason is Reason.INTERNAL_ERROR
    assert "secret" not in str(made)
    assert "KeyError" in str(made)
    assert made.__cause__ is cause


def test_every_error_class_has_a_reason_from_the_enum() -> None:
    """Each class of the tree gives a Reason, and an invalid request's reason is its
    violations' shared one (or INVALID_REQUEST when they differ)."""
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, EmbedgateError)
    ]
    assert len(classes) >= 18
    for kind in classes:
        assert isinstance(kind.reason, Reason), kind
    one = InvalidRequestError([Violation("inputs[0].text", "is empty", Reason.EMPTY_TEXT)])
    assert one.reason is Reason.EMPTY_TEXT
    two = InvalidRequestError(
        [
            Violation("inputs[0].text", "is empty", Reason.EMPTY_TEXT),
            Violation("model", "is required", Reason.MISSING_FIELD),
        ]
    )
    assert two.reason is Reason.INVALID_REQUEST


def test_the_reasons_are_the_documented_table() -> None:
    """docs/errors.md's table of codes and reasons lists exactly the Reason enum: a
    reason added, renamed or dropped in one place and not the other fails here."""
    table = [
        line for line in DOCS.read_text(encoding="utf-8").splitlines() if line.startswith("| ")
    ]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(table)))
    assert documented == {reason.value for reason in Reason}
