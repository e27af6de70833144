"""CTyun Wishub: OpenAI-style text embeddings, with the vector under ``embeddings``.

Source: CTyun Wishub's interface document "嵌入" (Embeddings), read 2026-11-21.

The CTyun document: ``model`` is a model ID, ``input`` a string or list of strings
(at most 8192 tokens each), ``encoding_format`` float or base64, ``dimensions`` only for
text-embedding-3-class models. Its reply table and its own sample code name the vector
field ``embeddings`` (OpenAI says ``embedding``): both are accepted. Errors are
``{"error": {"code", "type", "message"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from embedgate.server.providers.openai_compatible import OpenAICompatible, OpenAIShapeSettings
from embedgate.server.providers.settings import VendorSettings


class CTyunSettings(OpenAIShapeSettings):
    provider: Literal["ctyun"] = "ctyun"


class CTyun(OpenAICompatible):
    vendor: ClassVar[str] = "ctyun"
    title: ClassVar[str] = "CTyun Wishub"
    settings_type: ClassVar[type[VendorSettings]] = CTyunSettings
    default_base_url: ClassVar[str | None] = "https://wishub-x1.ctyun.cn/v1"
    vector_fields: ClassVar[tuple[str, ...]] = ("embeddings", "embedding")
    # Model IDs are opaque hashes: the vector size is always configured.
    known_sizes: ClassVar[Mapping[str, int]] = {}
    # The document gives no per-request count; a modest default, raised with max_batch.
    default_batch: ClassVar[int] = 16
