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
    OutputType,
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
    echo,
)
from embedgate.server.providers.base import Provider, Reranker
from embedgate.server.routing.cache import VectorCache, entry_key, vector_keys
from embedgate.server.routing.coalesce import Coalescer, ItemVector, part_request_id
from embedgate.server.routing.vectors import decode_float32, encode_vectors

T = TypeVar("T")

# Where a violation about input ``index`` points: its content (``inputs[2].image``)
# or its text (``inputs[2].text_image.text``).
PathOf = Callable[[int, Input, bool], str]


def input_path(field: str) -> PathOf:
    """Paths into a repeated ``Input`` field: ``inputs[2].image``, or the text of a
    text+image input (``inputs[2].text_image.text``)."""

    def path_of(index: int, item: Input, text: bool) -> str:
        if text and isinstance(item, TextImageInput):
            return f"{field}[{index}].text_image.text"
        return f"{field}[{index}].{item.modality.value}"

    return path_of


embed_input_path = input_path("inputs")


@dataclass(frozen=True, slots=True)
class Encoded:
    """One input's vector, encoded as the caller asked, and where it came from."""

    payload: bytes
    # From the cache: the model was not called for it, and it cost no tokens.
    cached: bool
    # Its own tokens, where known (see ``_usage`` for the rest).
    tokens: int | None
    batch: int = 0
    batch_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """Every input's vector, in the caller's order (``items[i]`` is input ``i``)."""

    model: str
    items: tuple[Encoded, ...]
    usage: Usage | None

    @property
    def calls(self) -> int:
        """Model requests (vendor requests, or local batches) that carried its inputs."""
        return len({item.batch for item in self.items if not item.cached})


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One input's outcome: its vector, or the error that stopped it."""

    index: int
    item: Encoded | None = None
    error: EmbedgateError | None = None


@dataclass(frozen=True, slots=True)
class RankedItem:
    index: int
    score: float
    # The document's vector came from the cache (cosine ranking only).
    cached: bool = False


@dataclass(frozen=True, slots=True)
class RerankResult:
    model: str
    ranked: tuple[RankedItem, ...]
    usage: Usage | None
    # How the scores were made: the vendor's reranker, or embedding cosine similarity.
    method: Literal["vendor", "embedding_cosine"] = "embedding_cosine"
    query_cached: bool = False
    # Model requests made for it (vendor requests, or local batches).
    calls: int = 0


@dataclass(slots=True)
class _Lookup:
    """A call's inputs after the cache: what it had, and futures for the rest."""

    found: list[bytes | None]
    # Positions (in the call) of the inputs sent to the model, with their futures.
    sent: list[int]
    futures: list[asyncio.Future[ItemVector]]
    # Cache entry keys of every input; None when the call does not use the cache.
    keys: list[bytes] | None


class Router:
    """Serves every configured model through its provider."""

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        coalesce_wait_s: Mapping[str, float] | None = None,
        cache: VectorCache | None = None,
    ) -> None:
        """``coalesce_wait_s``: per model name, how long a batch waits for other calls to
        join it (absent or 0: calls are not merged). ``cache``: where vectors are kept
        between calls (None: nowhere, and identical inputs in flight are not merged)."""
        self._providers = list(providers)
        self._waits = dict(coalesce_wait_s or {})
        self._cache = cache
        self._by_name: dict[str, Provider] = {}
        self._queues: dict[str, Coalescer] = {}

    async def start(self) -> None:
        await asyncio.gather(*(provider.start() for provider in self._providers))
        if self._cache is not None:
            await self._cache.start()
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
        if self._cache is not None:
            await self._cache.close()

    def models(self) -> list[ModelInfo]:
        return [provider.info for provider in self._providers]

    def resolve(self, name: str) -> Provider:
        provider = self._by_name.get(name)
        if provider is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ModelNotFoundError(
                f"no model named {echo(name)!r} is configured (models: {known})",
                metadata={"model": echo(name)},
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
        elif len(options.instruction) > info.max_text_chars:
            violations.append(_too_long("instruction", len(options.instruction), info))
        accepted: list[int] = []
        subset: list[Input] = []
        for index, item in enumerate(inputs):
            if item is None:
                continue
            if item.modality in info.modalities:
                # Bounded before the model's own checks: a tokenizer's time grows with
                # the text, whatever its count of tokens.
                text = item.text if isinstance(item, TextInput | TextImageInput) else None
                if text is not None and len(text) > info.max_text_chars:
                    violations.append(_too_long(path_of(index, item, True), len(text), info))
                else:
                    accepted.append(index)
                    subset.append(item)
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

    async def _look_up(
        self, provider: Provider, inputs: Sequence[Input], options: EmbedOptions
    ) -> _Lookup:
        """Take what the cache has; send the rest to the model's queue."""
        queue = self._queues[provider.info.name]
        cache = self._cache
        if cache is None or not options.cache:
            futures = queue.submit(inputs, options)
            return _Lookup([None] * len(inputs), list(range(len(inputs))), futures, None)
        content = vector_keys(provider.info, options, inputs)
        keys = [entry_key(key, options.output_type) for key in content]
        found = await cache.get_many(keys)
        sent = [position for position, payload in enumerate(found) if payload is None]
        if not sent:
            return _Lookup(found, sent, [], keys)
        futures = queue.submit(
            [inputs[position] for position in sent],
            options,
            keys=[content[position] for position in sent],
            indexes=sent,
            count=len(inputs),
        )
        return _Lookup(found, sent, futures, keys)

    def _encode(
        self,
        keys: Sequence[bytes] | None,
        positions: Sequence[int],
        items: Sequence[ItemVector],
        output: OutputType,
    ) -> list[Encoded]:
        """Encode vectors fresh from the model (a batch at once) and cache them under
        the call's entry ``keys`` (None: the call does not use the cache)."""
        if not items:
            return []
        payloads = encode_vectors(np.stack([item.vector for item in items]), output)
        if self._cache is not None and keys is not None:
            for position, payload in zip(positions, payloads, strict=True):
                self._cache.put(keys[position], payload)
        return [
            Encoded(payload, False, item.tokens, item.batch, item.batch_tokens)
            for payload, item in zip(payloads, items, strict=True)
        ]

    async def embed(
        self, provider: Provider, inputs: Sequence[Input], options: EmbedOptions
    ) -> EmbedResult:
        """All or nothing: the first failure is raised, naming the input it belongs to,
        and the call's other inputs are withdrawn."""
        queue = self._queues[provider.info.name]
        if (self._cache is None or not options.cache) and queue.runs_inline(len(inputs)):
            # Nothing to look up, merge or share: one request from this task.
            async with _until_deadline(provider):
                sent = await queue.embed_now(
                    inputs, options, indexes=range(len(inputs)), count=len(inputs)
                )
            items = tuple(self._encode(None, range(len(inputs)), sent, options.output_type))
            return EmbedResult(model=provider.info.name, items=items, usage=_usage(items))
        lookup = await self._look_up(provider, inputs, options)
        fresh: Sequence[ItemVector] = ()
        if lookup.futures:  # else every vector came from the cache: nothing to wait for
            try:
                async with _until_deadline(provider):
                    fresh = await asyncio.gather(*lookup.futures)
            finally:
                for future in lookup.futures:
                    future.cancel()
        encoded = self._encode(lookup.keys, lookup.sent, fresh, options.output_type)
        slots: list[Encoded | None] = [
            None if payload is None else Encoded(payload, True, 0) for payload in lookup.found
        ]
        for position, item in zip(lookup.sent, encoded, strict=True):
            slots[position] = item
        items = tuple(item for item in slots if item is not None)
        if len(items) != len(inputs):
            raise InternalError(f"{len(items)} vectors for {len(inputs)} inputs")
        return EmbedResult(model=provider.info.name, items=items, usage=_usage(items))

    async def embed_each(
        self, provider: Provider, inputs: Sequence[Input], options: EmbedOptions
    ) -> AsyncIterator[ItemResult]:
        """Yield each input's outcome as soon as it is known, in any order: cached
        ones first, then each batch's as it is done. A failed batch yields an error
        for each of its inputs; the others go on."""
        lookup = await self._look_up(provider, inputs, options)
        index_of = dict(zip(lookup.futures, lookup.sent, strict=True))
        pending: set[asyncio.Future[ItemVector]] = set(lookup.futures)
        try:
            for index, payload in enumerate(lookup.found):
                if payload is not None:
                    yield ItemResult(index=index, item=Encoded(payload, True, 0))
            async with _until_deadline(provider):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in sorted(done, key=index_of.__getitem__):
                        index = index_of[future]
                        error = future.exception()
                        if error is not None:
                            yield ItemResult(index=index, error=_as_error(error))
                            continue
                        (item,) = self._encode(
                            lookup.keys, [index], [future.result()], options.output_type
                        )
                        yield ItemResult(index=index, item=item)
        finally:
            for future in lookup.futures:
                future.cancel()

    async def rerank(
        self,
        provider: Provider,
        query: str | None,
        documents: Sequence[Input | None],
        *,
        field: str = "documents",
        top_n: int | None,
        options: EmbedOptions,
        prior: Sequence[Violation] = (),
    ) -> RerankResult:
        """Rank the documents (given in request field ``field``) by relevance to the
        query: with the vendor's reranker where the model has one, else by the cosine
        similarity of their embeddings (through the cache). ``None`` stands for a
        query or document the edge already rejected."""
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
        inputs: list[Input | None] = [None if query is None else TextInput(query), *documents]
        document_path = input_path(field)

        def path_of(index: int, item: Input, text: bool) -> str:
            if index == 0:
                return "query"
            if field == "documents":
                return f"documents[{index - 1}]"
            return document_path(index - 1, item, text)

        scoring = EmbedOptions(
            normalize=True, request_id=options.request_id, user=options.user, cache=options.cache
        )
        valid = await self.validate(
            provider,
            inputs,
            scoring,
            path_of=path_of,
            count=(field, len(documents)),
            prior=violations,
            embedding=not info.native_rerank,
        )
        if info.native_rerank and isinstance(provider, Reranker):
            texts = [item.text for item in valid if isinstance(item, TextInput)]
            if len(texts) != len(valid):  # the reranker's modalities are text only
                raise InternalError(f"model {info.name} was given a document that is not text")
            return await self._rerank_natively(
                provider, provider, texts[0], texts[1:], top_n, options
            )
        result = await self.embed(provider, valid, scoring)
        matrix = np.stack([decode_float32(item.payload) for item in result.items])
        scores = matrix[1:] @ matrix[0]
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        ranked = tuple(
            RankedItem(index=int(i), score=float(scores[i]), cached=result.items[i + 1].cached)
            for i in order
        )
        return RerankResult(
            model=info.name,
            ranked=ranked,
            usage=result.usage,
            query_cached=result.items[0].cached,
            calls=result.calls,
        )

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
            RankedItem(index=start + item.index, score=item.score)
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
            calls=len(rankings),
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


def _usage(items: Sequence[Encoded]) -> Usage | None:
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


def _too_long(field: str, length: int, info: ModelInfo) -> Violation:
    return Violation(
        field,
        f"has {length} characters; model {info.name} takes at most {info.max_text_chars} "
        "(its max_text_chars)",
        "INPUT_TOO_LONG",
    )


def _violation_order(violation: Violation) -> tuple[int, str]:
    # inputs[10] after inputs[9]: order by the first index in the path, then the path.
    field = violation.field
    if field.startswith("inputs[") or field.startswith("documents["):
        number = field[field.index("[") + 1 : field.index("]")]
        return (int(number), field)
    return (-1, field)
