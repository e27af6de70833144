"""Embedding a call's inputs: the cache first, then the model's batching queue, and the
vectors encoded as the caller asked, in the caller's order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from embedgate.server import tracing
from embedgate.server.deadlines import current_deadline
from embedgate.server.domain import EmbedOptions, Input, OutputType, Usage
from embedgate.server.errors import DeadlineExceededError, EmbedgateError, InternalError, unexpected
from embedgate.server.routing.cache import VectorCache, entry_key, vector_keys
from embedgate.server.routing.coalesce import ItemVector
from embedgate.server.routing.model import Model
from embedgate.server.routing.vectors import encode_vectors


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
    # The deployment that served it, for a model with several.
    deployment: str = ""


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

    @property
    def deployments(self) -> list[str]:
        """The deployments that served its inputs (for a model with several)."""
        return served_by(self.items)


def served_by(items: Iterable[Encoded]) -> list[str]:
    """The deployments that served ``items``, by name."""
    return sorted({item.deployment for item in items if item.deployment})


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One input's outcome: its vector, or the error that stopped it."""

    index: int
    item: Encoded | None = None
    error: EmbedgateError | None = None


@dataclass(slots=True)
class _Lookup:
    """A call's inputs after the cache: what it had, and futures for the rest."""

    found: list[bytes | None]
    # Positions (in the call) of the inputs sent to the model, with their futures.
    sent: list[int]
    futures: list[asyncio.Future[ItemVector]]
    # Cache entry keys of every input; None when the call does not use the cache.
    keys: list[bytes] | None


class Embedder:
    """Embeds calls' inputs through the cache (None: no cache, and identical inputs in
    flight are not merged) and each model's queue."""

    def __init__(self, cache: VectorCache | None) -> None:
        self._cache = cache

    async def _look_up(
        self, model: Model, inputs: Sequence[Input], options: EmbedOptions
    ) -> _Lookup:
        """Take what the cache has; send the rest to the model's queue."""
        queue = model.queue
        cache = self._cache
        if cache is None or not options.cache:
            futures = queue.submit(inputs, options)
            return _Lookup([None] * len(inputs), list(range(len(inputs))), futures, None)
        content = vector_keys(model.info, options, inputs)
        keys = [entry_key(key, options.output_type) for key in content]
        with tracing.span("embedgate.cache.lookup") as span:
            found = await cache.get_many(keys)
            sent = [position for position, payload in enumerate(found) if payload is None]
            if span is not None:
                span.set_attribute("embedgate.cache.hits", len(found) - len(sent))
                span.set_attribute("embedgate.cache.misses", len(sent))
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
            Encoded(payload, False, item.tokens, item.batch, item.batch_tokens, item.deployment)
            for payload, item in zip(payloads, items, strict=True)
        ]

    async def embed(
        self, model: Model, inputs: Sequence[Input], options: EmbedOptions
    ) -> EmbedResult:
        """All or nothing: the first failure is raised, naming the input it belongs to,
        and the call's other inputs are withdrawn."""
        queue = model.queue
        if (self._cache is None or not options.cache) and queue.runs_inline(len(inputs)):
            # Nothing to look up, merge or share: one request from this task.
            async with _until_deadline(model):
                sent = await queue.embed_now(
                    inputs, options, indexes=range(len(inputs)), count=len(inputs)
                )
            items = tuple(self._encode(None, range(len(inputs)), sent, options.output_type))
            return EmbedResult(model=model.info.name, items=items, usage=_usage(items))
        lookup = await self._look_up(model, inputs, options)
        fresh: Sequence[ItemVector] = ()
        if lookup.futures:  # else every vector came from the cache: nothing to wait for
            try:
                with tracing.span("embedgate.batch.wait") as waiting:
                    async with _until_deadline(model):
                        fresh = await asyncio.gather(*lookup.futures)
                    # The caller's trace shows the batches its inputs went in.
                    tracing.link(waiting, (item.span for item in fresh))
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
        return EmbedResult(model=model.info.name, items=items, usage=_usage(items))

    async def embed_each(
        self, model: Model, inputs: Sequence[Input], options: EmbedOptions
    ) -> AsyncIterator[ItemResult]:
        """Yield each input's outcome as soon as it is known, in any order: cached
        ones first, then each batch's as it is done. A failed batch yields an error
        for each of its inputs; the others go on."""
        lookup = await self._look_up(model, inputs, options)
        index_of = dict(zip(lookup.futures, lookup.sent, strict=True))
        pending: set[asyncio.Future[ItemVector]] = set(lookup.futures)
        try:
            for index, payload in enumerate(lookup.found):
                if payload is not None:
                    yield ItemResult(index=index, item=Encoded(payload, True, 0))
            async with _until_deadline(model):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in sorted(done, key=index_of.__getitem__):
                        index = index_of[future]
                        error = future.exception()
                        if error is not None:
                            yield ItemResult(index=index, error=unexpected(error))
                            continue
                        (item,) = self._encode(
                            lookup.keys, [index], [future.result()], options.output_type
                        )
                        yield ItemResult(index=index, item=item)
        finally:
            for future in lookup.futures:
                future.cancel()


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


@asynccontextmanager
async def _until_deadline(model: Model) -> AsyncIterator[None]:
    """Wait no longer than the caller's deadline, whatever batch its inputs are in."""
    deadline = current_deadline()
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError:
        name = model.name
        raise DeadlineExceededError(
            f"the deadline passed while model {name} was working", metadata={"model": name}
        ) from None
