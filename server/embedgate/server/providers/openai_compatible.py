"""Any OpenAI-compatible ``/embeddings`` endpoint (OpenAI itself, vLLM, TEI, Ollama...),
and the base of the vendors that follow the same shape with their own quirks.

Source: OpenAI's API reference, "Embeddings: Create embeddings", read 2026-11-21.

Text only; ``input`` is a list of strings; ``dimensions`` is sent where the model takes
it (text-embedding-3 models, or ``accepts_dimensions: true``); vectors are asked for
as base64 unless configured otherwise; errors are
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from embedgate.server.domain import Dimensions, Input, Modality
from embedgate.server.providers.dialect import (
    Capabilities,
    Dialect,
    WireOptions,
    batch_limit,
    fixed_size,
    require_dimensions,
    texts_only,
)
from embedgate.server.providers.settings import VendorSettings


class OpenAIShapeSettings(VendorSettings):
    """The keys of every vendor that follows OpenAI's embeddings shape."""

    # How vectors travel; default: base64, a third of the bytes of JSON floats.
    encoding_format: Literal["float", "base64"] | None = None
    # The vendor takes a size parameter (None: decided from the model's name).
    accepts_dimensions: bool | None = None


class OpenAISettings(OpenAIShapeSettings):
    provider: Literal["openai"] = "openai"
    # Self-hosted OpenAI-compatible servers often take no key.
    key_required: ClassVar[bool] = False


class OpenAICompatible(Dialect):
    vendor: ClassVar[str] = "openai"
    title: ClassVar[str] = "OpenAI-compatible endpoint"
    settings_type: ClassVar[type[VendorSettings]] = OpenAISettings
    settings: OpenAIShapeSettings
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"
    known_sizes: ClassVar[Mapping[str, int]] = {
        "text-embedding-3-small": 1536,
        "text-embedding-3-large": 3072,
        "text-embedding-ada-002": 1536,
    }
    # Inputs per request the vendor documents (None: undocumented) and the default
    # when it doesn't. OpenAI takes up to 2048; smaller servers set max_batch.
    documented_batch: ClassVar[int | None] = None
    default_batch: ClassVar[int] = 128

    def describe(self) -> Capabilities:
        settings = self.settings
        size = require_dimensions(settings, self.known_sizes, self.title)
        self.encoding = settings.encoding_format or "base64"
        sends = self.takes_dimensions()
        return Capabilities(
            modalities=frozenset({Modality.TEXT}),
            max_batch=batch_limit(settings, self.documented_batch, self.title, self.default_batch),
            native=Dimensions(default=size, minimum=1, maximum=size) if sends else fixed_size(size),
            sends_dimensions=sends,
            matryoshka=settings.matryoshka,
        )

    def takes_dimensions(self) -> bool:
        if self.settings.accepts_dimensions is not None:
            return self.settings.accepts_dimensions
        return self.settings.vendor_model.lower().startswith("text-embedding-3")

    def embed_body(self, inputs: Sequence[Input], wire: WireOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.vendor_model,
            "input": texts_only(inputs),
            "encoding_format": self.encoding,
        }
        if self.capabilities.sends_dimensions and wire.dimensions is not None:
            body["dimensions"] = wire.dimensions
        if wire.user:
            body["user"] = wire.user
        return body
