"""Baidu Qianfan v2 embeddings (``/v2/embeddings``).

Source: Baidu Qianfan ModelBuilder's API document "向量" (Embeddings), read 2026-11-21.

The Qianfan document: text models take a non-empty list of non-empty strings, with
per-model limits (embedding-v1: 16 texts of 1000 characters; bge-large-zh/en: 16 of
2000; tao-8k: exactly 1 of 28000); the multimodal gme-qwen2-vl-2b-instruct takes
``{"text", "image"}`` objects: a single text, a single image, or one pair, which the
gateway reads as one object per request. Only float output. Errors carry ``code``,
``message`` and ``type``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from embedgate.server.domain import Input, Modality
from embedgate.server.providers.dialect import (
    Capabilities,
    Dialect,
    Limits,
    VendorFault,
    WireOptions,
    batch_limit,
    fixed_size,
    require_dimensions,
    text_and_image,
    texts_only,
)
from embedgate.server.providers.settings import VendorSettings

MULTIMODAL = "gme-qwen2-vl-2b-instruct"
# Unknown (e.g. custom-trained) text models: the common limit of the documented ones.
DEFAULT_BATCH = 16


@dataclass(frozen=True, slots=True)
class _Known:
    texts: int
    chars: int | None
    size: int


# Per-request counts and characters from the document; vector sizes from the models'
# published cards (the document gives none).
KNOWN = {
    "embedding-v1": _Known(16, 1000, 384),
    "bge-large-zh": _Known(16, 2000, 1024),
    "bge-large-en": _Known(16, 2000, 1024),
    "tao-8k": _Known(1, 28000, 1024),
    MULTIMODAL: _Known(1, None, 1536),
}


class QianfanSettings(VendorSettings):
    provider: Literal["qianfan"] = "qianfan"


class Qianfan(Dialect):
    vendor: ClassVar[str] = "qianfan"
    title: ClassVar[str] = "Qianfan"
    settings_type: ClassVar[type[VendorSettings]] = QianfanSettings
    default_base_url: ClassVar[str | None] = "https://qianfan.baidubce.com/v2"

    def describe(self) -> Capabilities:
        settings = self.settings
        known = KNOWN.get(settings.vendor_model.lower())
        multimodal = settings.vendor_model.lower() == MULTIMODAL
        modalities = (
            frozenset({Modality.TEXT, Modality.IMAGE, Modality.TEXT_IMAGE})
            if multimodal
            else frozenset({Modality.TEXT})
        )
        sizes = {name: entry.size for name, entry in KNOWN.items()}
        return Capabilities(
            modalities=modalities,
            max_batch=batch_limit(
                settings, known.texts if known else None, self.title, DEFAULT_BATCH
            ),
            native=fixed_size(require_dimensions(settings, sizes, self.title)),
            matryoshka=settings.matryoshka,
        )

    def input_limits(self) -> Limits:
        known = KNOWN.get(self.settings.vendor_model.lower())
        return Limits(max_chars=known.chars if known else None)

    def embed_body(self, inputs: Sequence[Input], wire: WireOptions) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.vendor_model}
        if Modality.IMAGE in self.capabilities.modalities:
            body["input"] = [text_and_image(item) for item in inputs]
        else:
            body["input"] = texts_only(inputs)
        if wire.user:
            body["user"] = wire.user
        return body

    def error_in_reply(self, payload: Any) -> VendorFault | None:
        # The document puts code/message/type at the top level of an error body.
        if isinstance(payload, dict) and "data" not in payload and "code" in payload:
            return self.parse_error(payload)
        return super().error_in_reply(payload)
