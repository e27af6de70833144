"""A multimodal relay with ``/v1/embeddings`` and ``/v1/rerank``.

Source: the relay's API document "多模态向量嵌入" (multimodal embeddings), with its
rerank section, read 2026-11-21.

Its document: embeddings take ``input`` as a list of ``{"text", "image"}`` objects,
``normalized`` and ``embedding_type``; rerank takes ``query``, ``documents`` (strings)
and ``top_n`` and answers ``results[]`` of ``{index, relevance_score, document}``
sorted by score. Neither limit nor vector size is documented: both come from the
configuration. Errors follow the OpenAI shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from embedgate.server.config import HttpUrl
from embedgate.server.domain import Dimensions, Input, Modality
from embedgate.server.providers.base import Ranked, Ranking
from embedgate.server.providers.dialect import (
    BadReply,
    Capabilities,
    Dialect,
    ErrorInReply,
    Reranking,
    WireOptions,
    batch_limit,
    fixed_size,
    require_dimensions,
    text_and_image,
    usage_tokens,
)
from embedgate.server.providers.settings import VendorSettings, modality_set

DEFAULT_BATCH = 32
DEFAULT_RERANK_BATCH = 100


class AggregatorSettings(VendorSettings):
    provider: Literal["aggregator"] = "aggregator"
    base_url: HttpUrl  # the relay has no well-known address
    # What the model behind the relay does: embeddings, or ranking documents.
    task: Literal["embed", "rerank"] = "embed"
    modalities: list[Literal["text", "image", "text_image"]] | None = Field(
        default=None, min_length=1
    )
    encoding_format: Literal["float", "base64"] | None = None
    key_required: ClassVar[bool] = False


class Aggregator(Dialect, Reranking):
    vendor: ClassVar[str] = "aggregator"
    title: ClassVar[str] = "aggregator"
    settings_type: ClassVar[type[VendorSettings]] = AggregatorSettings
    settings: AggregatorSettings
    default_base_url: ClassVar[str | None] = None

    def describe(self) -> Capabilities:
        settings = self.settings
        if settings.task == "rerank":
            return Capabilities(
                modalities=frozenset({Modality.TEXT}),
                max_batch=batch_limit(settings, None, self.title, DEFAULT_RERANK_BATCH),
                native=fixed_size(1),
                embeds=False,
                reranks=True,
            )
        self.embedding_type = settings.encoding_format or "float"
        modalities = modality_set(settings.modalities) or frozenset(
            {Modality.TEXT, Modality.IMAGE, Modality.TEXT_IMAGE}
        )
        size = require_dimensions(settings, {}, self.title)
        return Capabilities(
            modalities=modalities,
            max_batch=batch_limit(settings, None, self.title, DEFAULT_BATCH),
            native=Dimensions(default=size, minimum=size, maximum=size),
            matryoshka=settings.matryoshka,
        )

    def embed_body(self, inputs: Sequence[Input], wire: WireOptions) -> dict[str, Any]:
        return {
            "model": self.settings.vendor_model,
            "input": [text_and_image(item) for item in inputs],
            "normalized": wire.normalize,
            "embedding_type": self.embedding_type,
        }

    def rerank_body(
        self, query: str, documents: Sequence[str], top_n: int | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.vendor_model,
            "query": query,
            "documents": list(documents),
        }
        if top_n is not None:
            body["top_n"] = top_n
        return body

    def parse_ranking(self, payload: Any, documents: int, top_n: int | None) -> Ranking:
        fault = self.error_in_reply(payload)
        if fault is not None:
            raise ErrorInReply(fault)
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list):
            raise BadReply("the reply has no results list")
        # A relay may ignore top_n and send every document; it may not send fewer than
        # asked for, nor more documents than there are.
        least = documents if top_n is None else min(top_n, documents)
        if not least <= len(results) <= documents:
            raise BadReply(f"the reply ranks {len(results)} of {documents} documents")
        ranked = []
        seen: set[int] = set()
        for position, item in enumerate(results):
            index = item.get("index") if isinstance(item, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < documents:
                raise BadReply(f"results[{position}].index is {index!r}, not 0 to {documents - 1}")
            if index in seen:
                raise BadReply(f"document {index} is ranked twice")
            seen.add(index)
            score = item.get("relevance_score")
            if (
                not isinstance(score, int | float)
                or isinstance(score, bool)
                or not math.isfinite(score)
            ):
                raise BadReply(f"results[{position}].relevance_score is not a finite number")
            ranked.append(Ranked(index=index, score=float(score)))
        return Ranking(results=tuple(ranked), total_tokens=usage_tokens(payload, "total_tokens"))
