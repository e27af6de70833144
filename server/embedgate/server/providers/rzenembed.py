"""360 RzenEmbed: one multimodal embedding per request.

Source: 360's "RzenEmbed API" document (in Chinese), read 2026-11-21.

The RzenEmbed document: only ``POST /v1/embeddings``; ``model`` is always
``"RzenEmbed"``; the content goes in ``texts`` (at most 1), ``images`` (at most 1, URL
or base64) and ``video`` (2 to 64 frames), with ``input: []`` left as the OpenAI SDK's
placeholder; text and image together give one fused vector; ``dimensions`` is one of
six sizes (default 2048); ``instruction`` and ``request_id`` are its own fields. A reply
whose ``response_status`` is not 0 or whose ``message`` is not ``success`` is an error,
whatever its HTTP status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from embedgate.server.domain import (
    Dimensions,
    ImageInput,
    Input,
    Modality,
    TextImageInput,
    TextInput,
)
from embedgate.server.providers.dialect import (
    Capabilities,
    Dialect,
    Limits,
    VendorFault,
    WireOptions,
    batch_limit,
    error_object,
    image_string,
)
from embedgate.server.providers.settings import (
    ModalityName,
    SettingError,
    VendorSettings,
    modality_set,
)

SIZES = (256, 512, 768, 1024, 1536, 2048)
DEFAULT_SIZE = 2048
DEFAULT_INSTRUCTION = "Represent the user's input."
MIN_FRAMES = 2
MAX_FRAMES = 64


class RzenEmbedSettings(VendorSettings):
    provider: Literal["rzenembed"] = "rzenembed"
    vendor_model: str = Field(default="RzenEmbed", min_length=1, max_length=256)
    # Sent when a call gives none (the vendor's own default otherwise).
    instruction: str | None = Field(default=None, min_length=1, max_length=4096)
    modalities: list[ModalityName] | None = Field(default=None, min_length=1)


class RzenEmbed(Dialect):
    vendor: ClassVar[str] = "rzenembed"
    title: ClassVar[str] = "RzenEmbed"
    settings_type: ClassVar[type[VendorSettings]] = RzenEmbedSettings
    settings: RzenEmbedSettings
    default_base_url: ClassVar[str | None] = "https://api.research.360.cn/v1"
    # The document lists `accept: application/json` as a required header.
    extra_headers: ClassVar[dict[str, str]] = {"accept": "application/json"}

    def describe(self) -> Capabilities:
        settings = self.settings
        default = settings.dimensions if settings.dimensions is not None else DEFAULT_SIZE
        if default not in SIZES:
            raise SettingError(
                "dimensions", f"RzenEmbed gives {', '.join(map(str, SIZES))}, not {default}"
            )
        return Capabilities(
            modalities=modality_set(settings.modalities) or frozenset(Modality),
            max_batch=batch_limit(settings, 1, self.title, 1),
            native=Dimensions(default=default, minimum=SIZES[0], maximum=SIZES[-1], allowed=SIZES),
            sends_dimensions=True,
            accepts_instruction=True,
            matryoshka=settings.matryoshka,
        )

    def input_limits(self) -> Limits:
        return Limits(min_frames=MIN_FRAMES, max_frames=MAX_FRAMES)

    def embed_body(self, inputs: Sequence[Input], wire: WireOptions) -> dict[str, Any]:
        (item,) = inputs  # one embedding per request
        body: dict[str, Any] = {
            "model": self.settings.vendor_model,
            "input": [],
            "dimensions": wire.dimensions or self.capabilities.native.default,
            "instruction": wire.instruction or self.settings.instruction or DEFAULT_INSTRUCTION,
        }
        if wire.request_id:
            body["request_id"] = wire.request_id
        if isinstance(item, TextInput):
            body["texts"] = [item.text]
        elif isinstance(item, ImageInput):
            body["images"] = [image_string(item.image)]
        elif isinstance(item, TextImageInput):
            body["texts"] = [item.text]
            body["images"] = [image_string(item.image)]
        else:
            body["video"] = [image_string(frame) for frame in item.frames]
        return body

    def error_in_reply(self, payload: Any) -> VendorFault | None:
        if not isinstance(payload, dict):
            return None
        status = payload.get("response_status")
        message = payload.get("message")
        if (status is not None and status != 0) or (message is not None and message != "success"):
            return self.parse_error(payload)
        return super().error_in_reply(payload)

    def parse_error(self, payload: Any) -> VendorFault:
        fault = error_object(payload)
        if isinstance(payload, dict) and "response_status" in payload:
            return VendorFault(
                code=str(payload["response_status"]),
                message=fault.message,
                type=fault.type,
                request_id=fault.request_id,
            )
        return fault
