"""The multimodal relay ("aggregator") fake. Follows the aggregator's embeddings and rerank
API document.

Rules enforced, embeddings: `model`, `normalized` (a boolean) and `embedding_type` (float
or base64) are required; `input` is a non-empty list of `{"text", "image"}` objects, each
with a non-empty string text or image, texts at most 8192 tokens. `normalized: false`
returns 2.5 times the unit vector, so a test can see the flag was honoured.

Rerank (`/rerank`, only this vendor has it): `model` and `query` are required, `documents` a
non-empty list of strings (at most `max_batch` when set), `top_n` at least 1. The results
are sorted by `rerank_score`, cut to `top_n` unless `ignore_top_n` plays a relay that
ignores it, each with its document; `usage` counts the query once per document, with
OpenAI-style details all zero.

Errors are OpenAI-shaped without `param`. The Authorization header is optional in the
document, so `api_key=None` is the way to play it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from aiohttp import web

from .base import (
    DEFAULT_KEY,
    FakeVendor,
    Fault,
    Job,
    Rejected,
    Route,
    check_tokens,
    count_tokens,
    item_key,
    rerank_score,
    spoil,
    string_list,
    typed_field,
    wants_base64,
)

NOT_NORMALIZED = 2.5  # the length of a vector asked for with normalized: false


class AggregatorFake(FakeVendor):
    """The multimodal relay: text and image objects, and a rerank endpoint."""

    default_dims: ClassVar[int] = 1024

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_KEY,
        dims: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        super().__init__(api_key=api_key, dims=dims, max_batch=max_batch)
        self.ignore_top_n = False  # True: rerank answers every document whatever top_n says

    def reset(self) -> None:
        super().reset()
        self.ignore_top_n = False

    def routes(self) -> dict[str, Route]:
        return super().routes() | {"/rerank": self.rerank}

    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        model = typed_field(body, "model", str, required=True)
        normalized = typed_field(body, "normalized", bool, required=True)
        typed_field(body, "embedding_type", str, required=True)
        b64 = wants_base64(body, "embedding_type", ("float", "base64"))
        value = body.get("input")
        if not isinstance(value, list) or not value:
            raise Rejected(400, "'input' must be a non-empty list of objects")
        keys, texts, images = [], [], 0
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise Rejected(400, f"input[{i}] must be an object with 'text' and/or 'image'")
            text, image = item.get("text") or None, item.get("image") or None
            if any(v is not None and not isinstance(v, str) for v in (text, image)):
                raise Rejected(400, f"input[{i}]: 'text' and 'image' must be strings")
            if not (text or image):
                raise Rejected(400, f"input[{i}] needs a non-empty 'text' or 'image'")
            keys.append(item_key(text=text, image=image))
            texts.append(text or "")
            images += image is not None
        used = check_tokens(texts) + images
        scale = 1.0 if normalized else NOT_NORMALIZED
        return Job(model, tuple(keys), self.dims, used, base64=b64, scale=scale)

    def rerank(
        self, request: web.Request, body: dict[str, Any], fault: Fault | None
    ) -> dict[str, Any]:
        """`/rerank`: the documents by `rerank_score`, best first, spoiled by a data fault."""
        typed_field(body, "model", str, required=True)
        query = typed_field(body, "query", str, required=True)
        top_n = typed_field(body, "top_n", int)
        if top_n is not None and top_n < 1:
            raise Rejected(400, "'top_n' must be at least 1", "top_n")
        documents = string_list(body.get("documents"), "documents")
        if not documents:
            raise Rejected(400, "'documents' must not be empty", "documents")
        if self.max_batch is not None and len(documents) > self.max_batch:
            raise Rejected(400, f"'documents' has {len(documents)} items, at most {self.max_batch}")
        scored = sorted(
            ((i, rerank_score(query, d)) for i, d in enumerate(documents)), key=lambda r: -r[1]
        )
        if top_n is not None and not self.ignore_top_n:
            scored = scored[:top_n]
        scored = spoil(scored, fault)
        if fault is not None and fault.kind == "nan" and scored:
            scored[0] = (scored[0][0], math.nan)
        # A cross-encoder reads the query with every document.
        tokens = count_tokens(query) * len(documents) + sum(map(count_tokens, documents))
        return {
            "results": [
                {"document": {"text": documents[i]}, "index": i, "relevance_score": s}
                for i, s in scored
            ],
            "usage": {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
        }


Fake = AggregatorFake
