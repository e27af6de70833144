"""What a request may ask of a model, checked before any model work.

Every problem is found at once and reported by position (``Problem``: the input's index
and the part at fault, or a part of the request): the door that received the request
turns positions into its own field paths.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedgate.server.domain import (
    EmbedOptions,
    Input,
    Modality,
    ModelInfo,
    TextImageInput,
    TextInput,
)
from embedgate.server.errors import Part, Problem, Reason, RejectedError
from embedgate.server.routing.model import Model


async def validate(
    model: Model,
    inputs: Sequence[Input | None],
    options: EmbedOptions,
    *,
    catalog: Sequence[ModelInfo],
    embedding: bool = True,
    count: int | None = None,
    found: Sequence[Problem] = (),
) -> list[Input]:
    """Check everything the model decides and return the inputs, or raise one
    ``RejectedError`` listing every problem (``found`` ones included). ``None`` stands
    for an input the door already rejected; ``catalog`` is every served model, named
    in messages as the ones that would do. ``embedding``: the call needs vectors (a
    vendor's reranker does not). ``count``: how many inputs the caller sent, where
    ``inputs`` holds more (a rerank's query)."""
    info = model.info
    problems = list(found)
    how_many = len(inputs) if count is None else count
    if how_many > info.max_inputs_per_call:
        problems.append(
            Problem(
                Part.INPUTS,
                f"has {how_many} items; model {info.name} takes at most "
                f"{info.max_inputs_per_call} per call",
                Reason.TOO_MANY_INPUTS,
            )
        )
    if embedding and not info.embeds:
        others = [m.name for m in catalog if m.embeds]
        problems.append(
            Problem(
                Part.MODEL,
                f"model {info.name} ranks documents but does not embed (models that "
                f"embed: {', '.join(others) or 'none'})",
                Reason.EMBED_NOT_SUPPORTED,
            )
        )
    if options.dimensions is not None and not info.dimensions.accepts(options.dimensions):
        problems.append(
            Problem(
                Part.DIMENSIONS,
                f"model {info.name} gives {info.dimensions.describe()} dimensions, "
                f"not {options.dimensions}",
                Reason.UNSUPPORTED_DIMENSIONS,
            )
        )
    if options.instruction and not info.accepts_instruction:
        problems.append(
            Problem(
                Part.INSTRUCTION,
                f"model {info.name} takes no instruction; leave it empty",
                Reason.INSTRUCTION_NOT_SUPPORTED,
            )
        )
    elif len(options.instruction) > info.max_text_chars:
        problems.append(_too_long(Part.INSTRUCTION, None, len(options.instruction), info))
    accepted: list[int] = []
    subset: list[Input] = []
    for index, item in enumerate(inputs):
        if item is None:
            continue
        if item.modality in info.modalities:
            # Bounded before the model's own checks: a tokenizer's time grows with the
            # text, whatever its count of tokens.
            text = item.text if isinstance(item, TextInput | TextImageInput) else None
            if text is not None and len(text) > info.max_text_chars:
                problems.append(_too_long(Part.TEXT, index, len(text), info))
            else:
                accepted.append(index)
                subset.append(item)
            continue
        others = [m.name for m in catalog if m.embeds and item.modality in m.modalities]
        where = (
            f"models that accept it: {', '.join(others)}"
            if others
            else "no configured model accepts it"
        )
        problems.append(
            Problem(
                Part.CONTENT,
                f"is {item.modality.value} input; model {info.name} accepts "
                f"{_describe(info.modalities)} only ({where})",
                Reason.UNSUPPORTED_MODALITY,
                index,
            )
        )
    if accepted:
        for problem in await model.provider.check(subset, options):
            # The provider saw the accepted inputs only: back to the caller's positions.
            at = accepted[problem.index] if problem.index is not None else None
            problems.append(Problem(problem.part, problem.description, problem.reason, at))
    if problems:
        raise RejectedError(problems, model=info.name)
    return [item for item in inputs if item is not None]


def _describe(modalities: frozenset[Modality]) -> str:
    return ", ".join(m.value for m in Modality if m in modalities)


def _too_long(part: Part, index: int | None, length: int, info: ModelInfo) -> Problem:
    return Problem(
        part,
        f"has {length} characters; model {info.name} takes at most {info.max_text_chars} "
        "(its max_text_chars)",
        Reason.INPUT_TOO_LONG,
        index,
    )
