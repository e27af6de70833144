"""Any OpenAI-compatible ``/embeddings`` endpoint (OpenAI itself, vLLM, TEI, Ollama...),
and the base of the vendors that follow the same shape with their own quirks.

Text only; ``input`` is a list of strings; ``dimensions`` is sent where the model takes
it (text-embedding-3 models, or ``accepts_dimensions: true``); vectors are asked for
as base64 unless configured otherwise; errors are
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from embedgate.server.domain import Dimensions, Input, Modality
from embedgate.server.providers.dialect import (
    Capabilities,
    Dialect,
    SettingError,
    VendorModel,
    WireOptions,
    batch_limit,
    fixed_size,
    require_dimensions,
    texts_only,
)

ENCODINGS = ("float", "base64")


class OpenAICompatible(Dialect):
    vendor: ClassVar[str] = "openai"
    title: ClassVar[str] = "OpenAI-compatible endpoint"
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

    def describe(self, model: VendorModel) -> Capabilities:
        size = require_dimensions(model, self.known_sizes, self.title)
        self.encoding = model.encoding_format or "base64"
        if self.encoding not in ENCODINGS:
            raise SettingError("encoding_format", f"must be one of {', '.join(ENCODINGS)}")
        sends = self.takes_dimensions(model)
        return Capabilities(
            modalities=frozenset({Modality.TEXT}),
            max_batch=batch_limit(model, self.documented_batch, self.title, self.default_batch),
            native=Dimensions(default=size, minimum=1, maximum=size) if sends else fixed_size(size),
            sends_dimensions=sends,
            matryoshka=model.matryoshka,
        )

    def takes_dimensions(self, model: VendorModel) -> bool:
        if model.accepts_dimensions is not None:
            return model.accepts_dimensions
        return model.vendor_model.lower().startswith("text-embedding-3")

    def embed_body(self, inputs: Sequence[Input], wire: WireOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model.vendor_model,
            "input": texts_only(inputs),
            "encoding_format": self.encoding,
        }
        if self.capabilities.sends_dimensions and wire.dimensions is not None:
            body["dimensions"] = wire.dimensions
        if wire.user:
            body["user"] = wire.user
        return body
