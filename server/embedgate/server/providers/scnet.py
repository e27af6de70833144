"""SCNet: OpenAI-style text embeddings, at most 5 texts per request.

Source: SCNet's interface document "文本向量(Embedding)" (text embeddings), read
2026-11-21.

The SCNet document: ``input`` is a string or a list of at most 5 strings (8192 tokens
each); Qwen3-Embedding-8B gives 4096 dimensions and the size "cannot be changed". The
document names the size field three ways (``dimension`` in its table, the string
``"4096"`` in its curl sample, ``dimensions`` in its Python sample), so the gateway never
sends it: other sizes come only from a local cut on a model configured
``matryoshka: true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from embedgate.server.providers.openai_compatible import OpenAICompatible, OpenAIShapeSettings
from embedgate.server.providers.settings import VendorSettings


class SCNetSettings(OpenAIShapeSettings):
    provider: Literal["scnet"] = "scnet"
    vendor_model: str = Field(default="Qwen3-Embedding-8B", min_length=1, max_length=256)

    @field_validator("accepts_dimensions")
    @classmethod
    def _size_is_fixed(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(
                "SCNet's document says the size cannot be changed: the gateway never sends "
                "one (matryoshka: true gives other sizes by a local cut)"
            )
        return value


class SCNet(OpenAICompatible):
    vendor: ClassVar[str] = "scnet"
    title: ClassVar[str] = "SCNet"
    settings_type: ClassVar[type[VendorSettings]] = SCNetSettings
    default_base_url: ClassVar[str | None] = "https://api.scnet.cn/api/llm/v1"
    known_sizes: ClassVar[Mapping[str, int]] = {"qwen3-embedding-8b": 4096}
    documented_batch: ClassVar[int | None] = 5

    def takes_dimensions(self) -> bool:
        return False
