"""Domain values shared by every layer: inputs, options and model capabilities.

These mirror the public contract (``embedgate.v1``) without depending on it, so the
routing and provider layers never import protobuf or grpc.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Modality(enum.Enum):
    """The kind of content an input carries: a closed set mirroring the proto ``oneof``."""

    TEXT = "text"
    IMAGE = "image"
    VIDEO = "video"
    TEXT_IMAGE = "text_image"


@dataclass(frozen=True, slots=True)
class Image:
    """An image given by URI (fetched by the vendor, never by us) or by its bytes."""

    uri: str | None = None
    data: bytes | None = None
    mime_type: str | None = None


@dataclass(frozen=True, slots=True)
class TextInput:
    text: str

    @property
    def modality(self) -> Modality:
        return Modality.TEXT


@dataclass(frozen=True, slots=True)
class ImageInput:
    image: Image

    @property
    def modality(self) -> Modality:
        return Modality.IMAGE


@dataclass(frozen=True, slots=True)
class VideoInput:
    frames: tuple[Image, ...]

    @property
    def modality(self) -> Modality:
        return Modality.VIDEO


@dataclass(frozen=True, slots=True)
class TextImageInput:
    text: str
    image: Image

    @property
    def modality(self) -> Modality:
        return Modality.TEXT_IMAGE


Input = TextInput | ImageInput | VideoInput | TextImageInput


class OutputType(enum.Enum):
    """How a vector is encoded for the caller (see ``OutputType`` in the contract)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    UINT8 = "uint8"
    BINARY = "binary"
    UBINARY = "ubinary"


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    """Per-request options that apply to every input of a call."""

    instruction: str = ""
    dimensions: int | None = None
    normalize: bool | None = None
    request_id: str = ""
    user: str = ""
    output_type: OutputType = OutputType.FLOAT32
    # Read and store vectors in the cache (when the gateway has one).
    cache: bool = True


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Dimensions:
    """The vector sizes a model can give.

    ``allowed`` lists them when the model takes only some sizes; when it is empty,
    any size from ``minimum`` to ``maximum`` is allowed.
    """

    default: int
    minimum: int
    maximum: int
    allowed: tuple[int, ...] = ()

    def accepts(self, size: int) -> bool:
        if self.allowed:
            return size in self.allowed
        return self.minimum <= size <= self.maximum

    def describe(self) -> str:
        if self.allowed:
            return "one of " + ", ".join(str(d) for d in self.allowed)
        return f"from {self.minimum} to {self.maximum}"


class DeploymentState(enum.Enum):
    """Whether one deployment of a model takes requests now."""

    IN_SERVICE = "in_service"
    PROBING = "probing"  # its breaker lets one probe request through
    OUT_OF_SERVICE = "out_of_service"  # breaker open, or waiting out a Retry-After


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    name: str
    provider: str
    state: DeploymentState


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a served model is and accepts, as ``ListModels`` reports it."""

    name: str
    provider: str
    modalities: frozenset[Modality]
    max_inputs_per_call: int
    dimensions: Dimensions
    # Characters per text (and instruction), checked before any tokenizer or vendor.
    max_text_chars: int = 65536
    embeds: bool = True
    reranks: bool = False
    # Reranks with its vendor's own reranker, not by comparing embeddings.
    native_rerank: bool = False
    accepts_instruction: bool = False
    normalizes_by_default: bool = True
    # Computed in this process (the local model), not by a vendor.
    in_process: bool = False
    # The label of its vector space, when configured.
    space: str = ""
    # Its deployments and their state now, for a model with several (ListModels).
    deployments: tuple[DeploymentStatus, ...] = ()
    # What the vectors come from beyond the name (the vendor's address and model, or
    # the local model's directory): a cached vector is reused only for the same source.
    source: str = ""


def estimate_tokens(inputs: Sequence[Input | str]) -> int:
    """Tokens ``inputs`` will count, estimated from above before the vendor counts them:
    one per three bytes of UTF-8 text (about a character of Chinese, most of a word of
    English) and one per image or frame, plus one per input. The vendor's count
    settles it."""
    total = 0
    for item in inputs:
        total += 1
        if isinstance(item, str):
            text = item
        elif isinstance(item, TextInput | TextImageInput):
            text = item.text
            total += isinstance(item, TextImageInput)
        elif isinstance(item, VideoInput):
            total += len(item.frames)
            continue
        else:
            total += isinstance(item, ImageInput)
            continue
        total += -(-len(text.encode("utf-8", "surrogatepass")) // 3)
    return total
