"""SCNet: OpenAI-style text embeddings, at most 5 texts per request.

The SCNet document: ``input`` is a string or a list of at most 5 strings (8192 tokens
each); Qwen3-Embedding-8B gives 4096 dimensions and the size "cannot be changed". The
document names the size field three ways (``dimension`` in its table, the string
``"4096"`` in its curl sample, ``dimensions`` in its Python sample), so the gateway never
sends it: other sizes come only from a local cut on a model configured
``matryoshka: true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from embedgate.server.providers.dialect import VendorModel
from embedgate.server.providers.openai_compatible import OpenAICompatible


class SCNet(OpenAICompatible):
    vendor: ClassVar[str] = "scnet"
    title: ClassVar[str] = "SCNet"
    default_base_url: ClassVar[str | None] = "https://api.scnet.cn/api/llm/v1"
    known_sizes: ClassVar[Mapping[str, int]] = {"qwen3-embedding-8b": 4096}
    documented_batch: ClassVar[int | None] = 5

    def takes_dimensions(self, model: VendorModel) -> bool:
        return False
