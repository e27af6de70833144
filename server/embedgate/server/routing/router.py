"""The served models by name, and the one door into routing: a door resolves a model,
has the request validated, then embeds or ranks through it.

The work itself lives beside this module: ``validation.py`` (what a model accepts),
``embedding.py`` (cache, batching, encoding), ``rerank.py`` (ranking documents).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from embedgate.server.deadlines import deadline_scope
from embedgate.server.domain import EmbedOptions, Input, ModelInfo
from embedgate.server.errors import ModelNotFoundError, echo
from embedgate.server.providers.base import Provider
from embedgate.server.quotas import Store
from embedgate.server.routing.cache import VectorCache
from embedgate.server.routing.coalesce import Coalescer
from embedgate.server.routing.deployments import DeploymentSet
from embedgate.server.routing.embedding import Embedder, EmbedResult, ItemResult
from embedgate.server.routing.model import Model
from embedgate.server.routing.rerank import Ranker, RerankResult, validate_rerank
from embedgate.server.routing.validation import validate

# How long the start-up space check of one model may take.
SPACE_CHECK_S = 60.0


class Router:
    """Serves every configured model through its provider."""

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        coalesce_wait_s: Mapping[str, float] | None = None,
        cache: VectorCache | None = None,
        quotas: Store | None = None,
    ) -> None:
        """``coalesce_wait_s``: per model name, how long a batch waits for other calls to
        join it (absent or 0: calls are not merged). ``cache``: where vectors are kept
        between calls (None: nowhere, and identical inputs in flight are not merged).
        ``quotas``: where the providers' vendor quotas are counted, closed with them."""
        self._providers = list(providers)
        self._quotas = quotas
        self._waits = dict(coalesce_wait_s or {})
        self._cache = cache
        self._embedder = Embedder(cache)
        self._ranker = Ranker(self._embedder)
        self._by_name: dict[str, Model] = {}
        self._calls: Callable[[], int] | None = None

    def watch_calls(self, calls: Callable[[], int]) -> None:
        """Tell the batching queues how many unary calls the server is serving now
        (the edge's count): a call alone on the server never waits for company.
        Before ``start``."""
        self._calls = calls

    async def start(self) -> None:
        await asyncio.gather(*(provider.start() for provider in self._providers))
        for provider in self._providers:
            if isinstance(provider, DeploymentSet) and provider.space_check is not None:
                # Before any caller: a space that is not one stops start-up.
                with deadline_scope(SPACE_CHECK_S):
                    await provider.verify_space(provider.space_check)
        if self._cache is not None:
            await self._cache.start()
        self._by_name = {}
        for provider in self._providers:
            name = provider.info.name
            queue = Coalescer(provider, wait_s=self._waits.get(name, 0.0), calls=self._calls)
            self._by_name[name] = Model(provider, queue)

    async def close(self) -> None:
        for model in self._by_name.values():
            await model.queue.close()
        await asyncio.gather(
            *(provider.close() for provider in self._providers), return_exceptions=True
        )
        if self._cache is not None:
            await self._cache.close()
        if self._quotas is not None:
            await self._quotas.close()

    def models(self) -> list[ModelInfo]:
        return [provider.info for provider in self._providers]

    def listing(self) -> list[ModelInfo]:
        """The models as ListModels shows them: with their deployments' state now."""
        return [
            dataclasses.replace(provider.info, deployments=provider.statuses())
            if isinstance(provider, DeploymentSet)
            else provider.info
            for provider in self._providers
        ]

    def resolve(self, name: str) -> Model:
        model = self._by_name.get(name)
        if model is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ModelNotFoundError(
                f"no model named {echo(name)!r} is configured (models: {known})",
                metadata={"model": echo(name)},
            )
        return model

    async def validate(
        self, model: Model, inputs: Sequence[Input | None], options: EmbedOptions
    ) -> list[Input]:
        """The inputs, once everything the model decides holds; else ``RejectedError``
        with every problem by position. ``None`` stands for an input the door rejected."""
        return await validate(model, inputs, options, catalog=self.models())

    async def validate_rerank(
        self,
        model: Model,
        query: str | None,
        documents: Sequence[Input | None],
        options: EmbedOptions,
    ) -> list[Input]:
        """The query then the documents, checked; else ``RejectedError``."""
        return await validate_rerank(model, query, documents, options, catalog=self.models())

    async def embed(
        self, model: Model, inputs: Sequence[Input], options: EmbedOptions
    ) -> EmbedResult:
        """All or nothing: the first failure is raised, naming the input it belongs to."""
        return await self._embedder.embed(model, inputs, options)

    def embed_each(
        self, model: Model, inputs: Sequence[Input], options: EmbedOptions
    ) -> AsyncIterator[ItemResult]:
        """Each input's outcome as soon as it is known, in any order."""
        return self._embedder.embed_each(model, inputs, options)

    async def rerank(
        self,
        model: Model,
        inputs: Sequence[Input],
        *,
        top_n: int | None,
        options: EmbedOptions,
    ) -> RerankResult:
        """Rank ``validate_rerank``'s documents by relevance to its query."""
        return await self._ranker.rerank(model, inputs, top_n=top_n, options=options)
