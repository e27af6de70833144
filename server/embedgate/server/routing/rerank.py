"""Ranking documents by relevance to a query: with the vendor's reranker where the model
has one, else by the cosine similarity of their embeddings (through the cache)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from embedgate.server.domain import EmbedOptions, Input, ModelInfo, TextInput, Usage
from embedgate.server.errors import InternalError, Part, Problem, Reason, RejectedError
from embedgate.server.providers.base import Reranker
from embedgate.server.routing.coalesce import part_request_id
from embedgate.server.routing.embedding import Embedder
from embedgate.server.routing.model import Model
from embedgate.server.routing.validation import validate
from embedgate.server.routing.vectors import decode_float32

T = TypeVar("T")


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
    # The deployments that served it (for a model with several).
    deployments: tuple[str, ...] = ()


def scoring_options(options: EmbedOptions) -> EmbedOptions:
    """How a rerank's query and documents are embedded to be compared: unit vectors of
    the model's default size."""
    return EmbedOptions(
        normalize=True, request_id=options.request_id, user=options.user, cache=options.cache
    )


async def validate_rerank(
    model: Model,
    query: str | None,
    documents: Sequence[Input | None],
    options: EmbedOptions,
    *,
    catalog: Sequence[ModelInfo],
) -> list[Input]:
    """The query then the documents, checked as inputs of the model; or one
    ``RejectedError`` where a problem's index is its document's (the query's are
    ``Part.QUERY``). ``None`` stands for a query or document the door already rejected."""
    info = model.info
    found = []
    if not info.reranks:
        others = [m.name for m in catalog if m.reranks]
        found.append(
            Problem(
                Part.MODEL,
                f"model {info.name} does not rerank (models that do: "
                f"{', '.join(others) or 'none'})",
                Reason.RERANK_NOT_SUPPORTED,
            )
        )
    inputs: list[Input | None] = [None if query is None else TextInput(query), *documents]
    try:
        return await validate(
            model,
            inputs,
            scoring_options(options),
            catalog=catalog,
            count=len(documents),
            found=found,
            embedding=not info.native_rerank,
        )
    except RejectedError as rejected:
        raise RejectedError(
            [_as_document(problem) for problem in rejected.problems], model=info.name
        ) from None


def _as_document(problem: Problem) -> Problem:
    """A problem of the combined inputs (the query first) as the request has them."""
    if problem.index is None:
        return problem
    if problem.index == 0:
        return dataclasses.replace(problem, part=Part.QUERY, index=None)
    return dataclasses.replace(problem, index=problem.index - 1)


class Ranker:
    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder

    async def rerank(
        self,
        model: Model,
        inputs: Sequence[Input],
        *,
        top_n: int | None,
        options: EmbedOptions,
    ) -> RerankResult:
        """Rank ``inputs[1:]`` (the documents) by relevance to ``inputs[0]`` (the
        query), as ``validate_rerank`` returned them."""
        info = model.info
        provider = model.provider
        if info.native_rerank and isinstance(provider, Reranker):
            texts = [item.text for item in inputs if isinstance(item, TextInput)]
            if len(texts) != len(inputs):  # the reranker's modalities are text only
                raise InternalError(f"model {info.name} was given a document that is not text")
            return await self._rerank_natively(model, provider, texts[0], texts[1:], top_n, options)
        result = await self._embedder.embed(model, inputs, scoring_options(options))
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
            deployments=tuple(result.deployments),
        )

    async def _rerank_natively(
        self,
        model: Model,
        reranker: Reranker,
        query: str,
        documents: Sequence[str],
        top_n: int | None,
        options: EmbedOptions,
    ) -> RerankResult:
        """Through the vendor's reranker, split to its per-request limit. Scores are per
        document, so split replies merge by score; ``top_n`` is applied here whatever
        the vendor did with it."""
        size = max(1, model.provider.max_batch)
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
            model=model.name,
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


def _rerank_usage(totals: Sequence[int | None]) -> Usage | None:
    if not totals or any(total is None for total in totals):
        return None
    total = sum(t for t in totals if t is not None)
    return Usage(prompt_tokens=total, total_tokens=total)
