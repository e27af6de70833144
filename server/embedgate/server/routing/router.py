"""Model name → provider; validation that needs the model; batching and ordering."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from embedgate.server.deadlines import current_deadline
from embedgate.server.domain import (
    EmbedOptions,
    Input,
    Modality,
    ModelInfo,
    TextImageInput,
    TextInput,
    Usage,
)
from embedgate.server.errors import (
    DeadlineExceededError,
    EmbedgateError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    Violation,
)
from embedgate.server.providers.base import Provider, Ranked, Reranker, Vectors
from embedgate.server.routing.coalesce import Coalescer, ItemVector, part_request_id

T = TypeVar("T")

# Where a violation about input ``index`` points: its content (``inputs[2].image``)
# or its text (``inputs[2].text_image.text``).
PathOf = Callable[[int, Input, bool], str]


def embed_input_path(index: int, item: Input, text: bool) -> str:
    if text and isinstance(item, TextImageInput):
        return f"inputs[{index}].text_image.text"
    return f"inputs[{index}].{item.modality.value}"


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """Every input's vector, in the caller's order (row ``i`` is input ``i``)."""

    model: str
    vectors: Vectors
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One input's outcome: its vector, or the error that stopped it."""

    index: int
    vector: Vectors | None = None
    tokens: int | None = None
    error: EmbedgateError | None = None


@dataclass(frozen=True, slots=True)
class RerankResult:
    model: str
    ranked: tuple[Ranked, ...]
    usage: Usage | None
    # How the scores were made: the vendor's reranker, or embedding cosine similarity.
    method: Literal["vendor", "embedding_cosine"] = "embedding_cosine"


class Router:
    """Serves every configured model through its provider."""

    def __init__(
        self, providers: Sequence[Provider], *, coalesce_wait_s: Mapping[str, float] | None = None
    ) -> None:
        """``coalesce_wait_s``: per model name, how long a batch waits for other calls to
        join it (absent or 0: calls are not merged)."""
        self._providers = list(providers)
        self._waits = dict(coalesce_wait_s or {})
        self._by_name: dict[str, Provider] = {}
        self._queues: dict[str, Coalescer] = {}

    async def start(self) -> None:
        await asyncio.gather(*(provider.start() for provider in self._providers))
        self._by_name = {provider.info.name: provider for provider in self._providers}
        self._queues = {
            name: Coalescer(provider, wait_s=self._waits.get(name, 0.0))
            for name, provider in self._by_name.items()
        }

    async def close(self) -> None:
        for queue in self._queues.values():
            await queue.close()
        await asyncio.gather(
            *(provider.close() for provider in self._providers), return_exceptions=True
        )

    def models(self) -> list[ModelInfo]:
        return [provider.info for provider in self._providers]

    def resolve(self, name: str) -> Provider:
        provider = self._by_name.get(name)
        if provider is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ModelNotFoundError(
                f"no model named {name!r} is configured (models: {known})",
                metadata={"model": name},
            )
        return provider

    def _accepting(self, modality: Modality) -> list[str]:
        return [info.name for info in self.models() if info.embeds and modality in info.modalities]

    async def validate(
        self,
        provider: Provider,
        inputs: Sequence[Input | None],
        options: EmbedOptions,
        *,
        path_of: PathOf = embed_input_path,
        count: tuple[str, int] | None = None,
        prior: Sequence[Violation] = (),
        embedding: bool = True,
    ) -> list[Input]:
        """Check everything the model decides, before any model work, and raise one
        ``InvalidRequestError`` listing every violation, ``prior`` ones (found by the
        edge) included. ``None`` stands for an input the edge already rejected.
        ``count`` is the field that holds the inputs and how many it holds."""
        info = provider.info
        violations = list(prior)
        field, how_many = count if count is not None else ("inputs", len(inputs))
        if how_many > info.max_inputs_per_call:
            violations.append(
                Violation(
                    field,
                    f"has {how_many} items; model {info.name} takes at most "
                    f"{info.max_inputs_per_call} per call",
                    "TOO_MANY_INPUTS",
                )
            )
        if embedding and not info.embeds:
            others = [m.name for m in self.models() if m.embeds]
            violations.append(
                Violation(
                    "model",
                    f"model {info.name} ranks documents but does not embed (models that "
                    f"embed: {', '.join(others) or 'none'})",
                    "EMBED_NOT_SUPPORTED",
                )
            )
        if options.dimensions is not None and not info.dimensions.accepts(options.dimensions):
            violations.append(
                Violation(
                    "dimensions",
                    f"model {info.name} gives {info.dimensions.describe()} dimensions, "
                    f"not {options.dimensions}",
                    "UNSUPPORTED_DIMENSIONS",
                )
            )
        if options.instruction and not info.accepts_instruction:
            violations.append(
                Violation(
                    "instruction",
                    f"model {info.name} takes no instruction; leave it empty",
                    "INSTRUCTION_NOT_SUPPORTED",
                )
            )
        accepted: list[int] = []
        for index, item in enumerate(inputs):
            if item is None:
                continue
            if item.modality in info.modalities:
                accepted.append(index)
                continue
            others = self._accepting(item.modality)
            where = (
                f"models that accept it: {', '.join(others)}"
                if others
                else "no configured model accepts it"
            )
            violations.append(
                Violation(
                    path_of(index, item, False),
                    f"is {item.modality.value} input; model {info.name} accepts "
                    f"{_describe(info.modalities)} only ({where})",
                    "UNSUPPORTED_MODALITY",
                )
            )
        if accepted:
            subset = [
                item for item in inputs if item is not None and item.modality in info.modalities
            ]
            for problem in await provider.check(subset, options):
                index = accepted[problem.index]
                item = inputs[index]
                assert item is not None
                path = (
                    f"{path_of(index, item, False)}.{problem.part}"
                    if problem.part
                    else path_of(index, item, True)
                )
                violations.append(Violation(path, problem.description, problem.reason))
        if violations:
            violations.sort(key=_violation_order)
            raise InvalidRequestError(violations, metadata={"model": info.name})
        return [item for item in inputs if item is not None]

    async def embed(
        self, provider: Provider, inputs: Sequence[Input], options: EmbedOptions
    ) -> EmbedResult:
        """All or nothing: the first failure is raised, naming the input it belongs to,
        and the call's other inputs are withdrawn."""
        futures = self._queues[provider.info.name].submit(inputs, options)
        try:
            async with _until_deadline(provider):
                items = await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()
        return EmbedResult(
            model=provider.info.name,
            vectors=np.stack([item.vector for item in items]),
            usage=_usage(items),
        )

    async def embed_each(
        self, provider: Provider, inputs: Sequence[Input], options: EmbedOptions
    ) -> AsyncIterator[ItemResult]:
        """Yield each input's outcome as soon as its batch is done, in any order. A
        failed batch yields an error for each of its inputs; the others go on."""
        futures = self._queues[provider.info.name].submit(inputs, options)
        index_of = {future: index for index, future in enumerate(futures)}
        pending: set[asyncio.Future[ItemVector]] = set(futures)
        try:
            async with _until_deadline(provider):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in sorted(done, key=index_of.__getitem__):
                        index = index_of[future]
                        error = future.exception()
                        if error is not None:
                            yield ItemResult(index=index, error=_as_error(error))
                            continue
                        item = future.result()
                        yield ItemResult(index=index, vector=item.vector, tokens=item.tokens)
        finally:
            for future in futures:
                future.cancel()

    async def rerank(
        self,
        provider: Provider,
        query: str | None,
        documents: Sequence[str | None],
        *,
        top_n: int | None,
        options: EmbedOptions,
        prior: Sequence[Violation] = (),
    ) -> RerankResult:
        """Rank by cosine similarity of the query's and each document's embedding.
        ``None`` stands for a query or document the edge already rejected."""
        info = provider.info
        violations = list(prior)
        if not info.reranks:
            others = [m.name for m in self.models() if m.reranks]
            violations.append(
                Violation(
                    "model",
                    f"model {info.name} does not rerank (models that do: "
                    f"{', '.join(others) or 'none'})",
                    "RERANK_NOT_SUPPORTED",
                )
            )
        texts = [query, *documents]
        inputs: list[Input | None] = [None if t is None else TextInput(t) for t in texts]

        def path_of(index: int, item: Input, text: bool) -> str:
            return "query" if index == 0 else f"documents[{index - 1}]"

        scoring = EmbedOptions(normalize=True, request_id=options.request_id, user=options.user)
        valid = await self.validate(
            provider,
            inputs,
            scoring,
            path_of=path_of,
            count=("documents", len(documents)),
            prior=violations,
            embedding=not info.native_rerank,
        )
        if info.native_rerank and isinstance(provider, Reranker):
            texts_ok = [item.text for item in valid if isinstance(item, TextInput)]
            return await self._rerank_natively(
                provider, provider, texts_ok[0], texts_ok[1:], top_n, options
            )
        result = await self.embed(provider, valid, scoring)
        scores = result.vectors[1:] @ result.vectors[0]
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        ranked = tuple(Ranked(index=int(i), score=float(scores[i])) for i in order)
        return RerankResult(model=info.name, ranked=ranked, usage=result.usage)

    async def _rerank_natively(
        self,
        provider: Provider,
        reranker: Reranker,
        query: str,
        documents: Sequence[str],
        top_n: int | None,
        options: EmbedOptions,
    ) -> RerankResult:
        """Through the vendor's reranker, split to its per-request limit. Scores are per
        document, so split replies merge by score; ``top_n`` is applied here whatever
        the vendor did with it."""
        size = max(1, provider.max_batch)
        starts = range(0, len(documents), size)
        single = len(starts) == 1
        rankings = await _all_or_nothing(
            [
                asyncio.create_task(
                    reranker.rerank(
                        query,
                        documents[start : start + size],
                        top_n if single else None,
                        self._chunk_options(options, start, single),
                    )
                )
                for start in starts
            ]
        )
        merged = [
            Ranked(index=start + item.index, score=item.score)
            for start, ranking in zip(starts, rankings, strict=True)
            for item in ranking.results
        ]
        # Highest score first; ties keep the documents' order.
        merged.sort(key=lambda item: (-item.score, item.index))
        if top_n is not None:
            merged = merged[:top_n]
        return RerankResult(
            model=provider.info.name,
            ranked=tuple(merged),
            usage=_rerank_usage([ranking.total_tokens for ranking in rankings]),
            method="vendor",
        )

    @staticmethod
    def _chunk_options(options: EmbedOptions, start: int, single: bool) -> EmbedOptions:
        request_id = part_request_id(options.request_id, start, whole=single)
        return dataclasses.replace(options, request_id=request_id)


async def _all_or_nothing(tasks: Sequence[asyncio.Task[T]]) -> list[T]:
    """Wait for every task; the first failure cancels the others and is raised."""
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _usage(items: Sequence[ItemVector]) -> Usage | None:
    """Tokens of the whole call, when they can be told: each input's own count, or
    the total of a batch that held only this call's inputs. A batch shared with other
    calls counts tokens for all of them together, which no caller can be charged."""
    total = 0
    batches: set[int] = set()
    for item in items:
        if item.tokens is not None:
            total += item.tokens
        elif item.batch_tokens is not None:
            if item.batch not in batches:
                batches.add(item.batch)
                total += item.batch_tokens
        else:
            return None
    return Usage(prompt_tokens=total, total_tokens=total)


def _rerank_usage(totals: Sequence[int | None]) -> Usage | None:
    if not totals or any(total is None for total in totals):
        return None
    total = sum(t for t in totals if t is not None)
    return Usage(prompt_tokens=total, total_tokens=total)


@asynccontextmanager
async def _until_deadline(provider: Provider) -> AsyncIterator[None]:
    """Wait no longer than the caller's deadline, whatever batch its inputs are in."""
    deadline = current_deadline()
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError:
        name = provider.info.name
        raise DeadlineExceededError(
            f"the deadline passed while model {name} was working", metadata={"model": name}
        ) from None


def _as_error(error: BaseException) -> EmbedgateError:
    if isinstance(error, EmbedgateError):
        return error
    return InternalError(f"unexpected failure: {type(error).__name__}")


def _describe(modalities: frozenset[Modality]) -> str:
    return ", ".join(m.value for m in Modality if m in modalities)


def _violation_order(violation: Violation) -> tuple[int, str]:
    # inputs[10] after inputs[9]: order by the first index in the path, then the path.
    field = violation.field
    if field.startswith("inputs[") or field.startswith("documents["):
        number = field[field.index("[") + 1 : field.index("]")]
        return (int(number), field)
    return (-1, field)
