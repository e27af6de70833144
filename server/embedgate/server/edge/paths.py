"""Problems found by position (routing, the providers) as field paths of the request
they came in: only the edge knows whether the inputs were ``inputs``, ``documents`` or
``document_inputs``, and what each input was."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

from embedgate.server import tracing
from embedgate.server.domain import Input, TextImageInput
from embedgate.server.errors import (
    InvalidRequestError,
    Part,
    Problem,
    RejectedError,
    Violation,
)

# Request-level parts whose field is named as the part is.
_FIELDS = {
    Part.MODEL: "model",
    Part.DIMENSIONS: "dimensions",
    Part.INSTRUCTION: "instruction",
    Part.QUERY: "query",
}
# Documents given as plain strings: a problem is the document's, whatever its part.
PLAIN_DOCUMENTS = "documents"


def field_path(problem: Problem, inputs: Sequence[Input | None], field: str) -> str:
    """Where ``problem`` is in a request whose inputs are ``inputs``, in field ``field``:
    ``inputs[2].image``, ``inputs[2].text_image.text``, ``inputs[2].video.frames``,
    ``documents[4]``, ``documents``, ``dimensions``..."""
    index = problem.index
    if index is None:
        return field if problem.part is Part.INPUTS else _FIELDS[problem.part]
    if field == PLAIN_DOCUMENTS:
        return f"{field}[{index}]"
    item = inputs[index]
    at = f"{field}[{index}]"
    if item is None:  # pragma: no cover - routing reports nothing about rejected inputs
        return at
    content = f"{at}.{item.modality.value}"
    if problem.part is Part.FRAMES:
        return f"{content}.frames"
    if problem.part is Part.TEXT and isinstance(item, TextImageInput):
        return f"{content}.text"
    return content


def violations_of(
    problems: Sequence[Problem], inputs: Sequence[Input | None], field: str
) -> list[Violation]:
    return [
        Violation(
            field_path(problem, inputs, field), problem.description, problem.reason, problem.index
        )
        for problem in problems
    ]


def ordered(violations: Sequence[Violation]) -> list[Violation]:
    """The request's own fields first (by path), then each input's in input order."""
    return sorted(violations, key=lambda v: (-1 if v.index is None else v.index, v.field))


def invalid_request(
    found: Sequence[Violation],
    rejected: RejectedError | None,
    inputs: Sequence[Input | None],
    field: str,
    model: str,
) -> InvalidRequestError:
    """One error with every violation: ``found`` by the edge, and routing's problems
    (``rejected``) as paths into ``field``."""
    violations = list(found)
    if rejected is not None:
        violations += violations_of(rejected.problems, inputs, field)
    return InvalidRequestError(ordered(violations), metadata={"model": model})


async def validated(
    check: Awaitable[list[Input]],
    found: Sequence[Violation],
    inputs: Sequence[Input | None],
    field: str,
    model: str,
) -> list[Input]:
    """The inputs routing's ``check`` returns, when neither it nor the edge (``found``)
    found anything wrong; else one ``InvalidRequestError`` with every violation. Traced
    as the RPC's validation."""
    with tracing.span("embedgate.validate", {"embedgate.inputs": len(inputs)}):
        try:
            valid = await check
        except RejectedError as rejected:
            raise invalid_request(found, rejected, inputs, field, model) from None
        if found:
            raise invalid_request(found, None, inputs, field, model)
        return valid
