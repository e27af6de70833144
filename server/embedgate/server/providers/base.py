"""The shape every provider has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from embedgate.server.domain import EmbedOptions, Input, ModelInfo
from embedgate.server.errors import Problem

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class EmbedBatch:
    """The vectors of one batch, one row per input in batch order, and the tokens each
    input counted where the model says (``None`` where it does not)."""

    vectors: Vectors
    tokens: tuple[int, ...] | None = None
    # Tokens for the whole batch, where a vendor counts only those.
    total_tokens: int | None = None
    # Which deployment served it, for a model with several.
    deployment: str = ""

    @property
    def token_total(self) -> int | None:
        if self.total_tokens is not None:
            return self.total_tokens
        return sum(self.tokens) if self.tokens is not None else None


class Provider(Protocol):
    """One served model.

    ``embed`` is called with at most ``max_batch`` inputs that already passed the
    edge's validation and ``check``; it returns raw vectors (the routing layer
    applies ``dimensions`` and ``normalize``).
    """

    @property
    def info(self) -> ModelInfo: ...

    @property
    def max_batch(self) -> int: ...

    @property
    def waiting(self) -> int:
        """Vendor requests held back now, waiting for room in a quota or for a vendor's
        ``Retry-After``: while some wait, the batching queue keeps filling the next
        batch rather than sending small ones to wait behind them."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        """Per-input limits only this provider knows (such as a token count), each
        problem at its input's position in ``inputs``."""
        ...

    async def embed(self, inputs: Sequence[Input], options: EmbedOptions) -> EmbedBatch: ...


@dataclass(frozen=True, slots=True)
class Ranked:
    index: int
    score: float


@dataclass(frozen=True, slots=True)
class Ranking:
    """Documents ranked by a vendor's reranker, in the vendor's order."""

    results: tuple[Ranked, ...]
    total_tokens: int | None = None
    request_id: str | None = None


@runtime_checkable
class Reranker(Protocol):
    """A provider whose vendor ranks documents itself (a rerank endpoint)."""

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None, options: EmbedOptions
    ) -> Ranking: ...
