"""What every vendor dialect is: pure translation, no I/O.

A dialect builds the JSON body of a vendor request from domain inputs, parses the
vendor's reply into vectors (checking it rather than trusting it), and parses the
vendor's error body. The HTTP driver sends; ``VendorProvider`` ties the two together.
Shared here: the OpenAI-shaped ``data[]`` list most vendors reply with, vector
decoding (float arrays and base64 little-endian float32), and error-object parsing.
"""

from __future__ import annotations

import base64
import binascii
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import orjson

from embedgate.server.domain import (
    Dimensions,
    EmbedOptions,
    Image,
    ImageInput,
    Input,
    Modality,
    TextImageInput,
    TextInput,
    VideoInput,
)
from embedgate.server.errors import Part, Problem, Reason
from embedgate.server.providers.base import Ranking, Vectors
from embedgate.server.providers.settings import SettingError, VendorSettings


class BadReply(Exception):  # noqa: N818 - a condition, reported as VendorBadReplyError
    """The vendor's reply does not follow its dialect (shape, count, size, values)."""


@dataclass(frozen=True, slots=True)
class VendorFault:
    """What a vendor said went wrong, from its error body (every field optional)."""

    code: str | None = None
    message: str | None = None
    type: str | None = None
    request_id: str | None = None


class ErrorInReply(Exception):  # noqa: N818 - a condition, reported as VendorError
    """An HTTP 200 whose body is an error."""

    def __init__(self, fault: VendorFault) -> None:
        super().__init__(fault.message or "the vendor reported an error")
        self.fault = fault


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one vendor model can do, from its document and its settings."""

    modalities: frozenset[Modality]
    # Inputs per vendor request: the documented limit, or lower if configured.
    max_batch: int
    # The sizes the vendor itself returns.
    native: Dimensions
    # The vendor takes a size parameter for the sizes in ``native``.
    sends_dimensions: bool = False
    accepts_instruction: bool = False
    embeds: bool = True
    reranks: bool = False
    matryoshka: bool = False

    @property
    def dimensions(self) -> Dimensions:
        """The sizes a caller may ask for: the native ones, or any size up to the
        largest when the model is Matryoshka-trained (cut locally)."""
        if self.matryoshka:
            return Dimensions(default=self.native.default, minimum=1, maximum=self.native.maximum)
        return self.native


@dataclass(frozen=True, slots=True)
class WireOptions:
    """Per-request options as sent to the vendor."""

    dimensions: int | None  # the size to ask for; None: don't send one
    instruction: str
    request_id: str
    user: str
    normalize: bool


@dataclass(frozen=True, slots=True)
class Embeddings:
    """A checked reply: one row per input, in request order."""

    vectors: Vectors
    prompt_tokens: int | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-input limits a dialect checks before sending."""

    max_chars: int | None = None
    min_frames: int = 1
    max_frames: int | None = None


class Dialect(ABC):
    """Base of the vendor dialects, built from one model's settings (the vendor's own
    settings class, ``settings_type``). Subclasses set the class attributes, say what
    the model can do (``describe``), build the request body (``embed_body``), and
    override what their vendor does differently from the OpenAI embeddings shape."""

    vendor: ClassVar[str]  # the provider name in the configuration
    title: ClassVar[str]  # how messages name the vendor
    settings_type: ClassVar[type[VendorSettings]]
    default_base_url: ClassVar[str | None]
    embed_path: ClassVar[str] = "/embeddings"
    # Where the vendor puts the vector of each ``data[]`` item.
    vector_fields: ClassVar[tuple[str, ...]] = ("embedding",)
    extra_headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, settings: VendorSettings) -> None:
        if not isinstance(settings, self.settings_type):
            raise TypeError(
                f"{type(self).__name__} takes {self.settings_type.__name__}, "
                f"not {type(settings).__name__}"
            )
        self.settings = settings
        self.capabilities = self.describe()
        self.limits = self.input_limits()

    # -- what the model can do -------------------------------------------------

    @abstractmethod
    def describe(self) -> Capabilities:
        """What the configured model can do; ``SettingError`` if the settings cannot
        work with the vendor's document."""

    def input_limits(self) -> Limits:
        return Limits()

    # -- before sending --------------------------------------------------------

    def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        """Per-input limits, found before any vendor call."""
        problems: list[Problem] = []
        limits = self.limits
        for index, item in enumerate(inputs):
            text = item.text if isinstance(item, TextInput | TextImageInput) else None
            if text is not None and limits.max_chars is not None and len(text) > limits.max_chars:
                problems.append(
                    Problem(
                        Part.TEXT,
                        f"has {len(text)} characters; {self.title} model "
                        f"{self.settings.vendor_model} takes at most {limits.max_chars}",
                        Reason.INPUT_TOO_LONG,
                        index,
                    )
                )
            if isinstance(item, VideoInput) and limits.max_frames is not None:
                frames = len(item.frames)
                if not limits.min_frames <= frames <= limits.max_frames:
                    problems.append(
                        Problem(
                            Part.FRAMES,
                            f"has {frames} frames; {self.title} takes {limits.min_frames} to "
                            f"{limits.max_frames} frames per video",
                            Reason.FRAME_COUNT_OUT_OF_RANGE,
                            index,
                        )
                    )
        return problems

    @abstractmethod
    def embed_body(self, inputs: Sequence[Input], wire: WireOptions) -> dict[str, Any]:
        """The JSON body of one embeddings request for ``inputs``."""

    # -- after sending ---------------------------------------------------------

    def parse_embeddings(self, payload: Any, count: int, dims: int) -> Embeddings:
        fault = self.error_in_reply(payload)
        if fault is not None:
            raise ErrorInReply(fault)
        vectors = parse_data_list(payload, count, dims, self.vector_fields)
        return Embeddings(
            vectors=vectors,
            prompt_tokens=usage_tokens(payload, "prompt_tokens"),
            request_id=_string(payload, "request_id") or _string(payload, "id"),
        )

    def error_in_reply(self, payload: Any) -> VendorFault | None:
        """An error carried by an HTTP 200 reply, if any."""
        if isinstance(payload, dict) and payload.get("error"):
            return self.parse_error(payload)
        return None

    def parse_error(self, payload: Any) -> VendorFault:
        """The vendor's error body; ``{"error": {...}}`` by default (OpenAI style)."""
        return error_object(payload)


class Reranking(ABC):
    """The capability of a dialect whose vendor ranks documents itself (a rerank
    endpoint): only the dialects that have one inherit it."""

    rerank_path: ClassVar[str] = "/rerank"

    @abstractmethod
    def rerank_body(
        self, query: str, documents: Sequence[str], top_n: int | None
    ) -> dict[str, Any]:
        """The JSON body of one rerank request."""

    @abstractmethod
    def parse_ranking(self, payload: Any, documents: int, top_n: int | None) -> Ranking:
        """The checked ranking of ``documents`` documents."""


# -- shared pieces -------------------------------------------------------------


def decode_json(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        raise BadReply("the reply is not valid JSON") from None


def image_string(image: Image) -> str:
    """An image as vendors take it: its URI, passed through, or its bytes as base64."""
    if image.uri is not None:
        return image.uri
    return base64.b64encode(image.data or b"").decode("ascii")


def text_and_image(item: Input) -> dict[str, str]:
    """A text, image or text+image input as the ``{"text", "image"}`` object that
    Qianfan's multimodal model and the aggregator take."""
    if isinstance(item, TextInput):
        return {"text": item.text}
    if isinstance(item, ImageInput):
        return {"image": image_string(item.image)}
    if isinstance(item, TextImageInput):
        return {"text": item.text, "image": image_string(item.image)}
    raise ValueError(f"{item.modality.value} input has no text/image form")  # routing stops it


def texts_only(inputs: Sequence[Input]) -> list[str]:
    texts = []
    for item in inputs:
        if not isinstance(item, TextInput):  # routing checks modalities first
            raise ValueError(f"{item.modality.value} input sent to a text-only model")
        texts.append(item.text)
    return texts


def decode_vector(value: Any, where: str) -> Vectors:
    """A float array, or base64 of little-endian float32 values."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadReply(f"{where} is neither a float array nor base64") from None
        if len(raw) % 4:
            raise BadReply(f"{where} is base64 of {len(raw)} bytes, not float32 values")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise BadReply(f"{where} holds something other than numbers") from None
    raise BadReply(f"{where} is missing or not a vector")


def parse_data_list(payload: Any, count: int, dims: int, vector_fields: Sequence[str]) -> Vectors:
    """The OpenAI-shaped ``data[]``: exactly ``count`` items whose ``index`` values are
    0..count-1 each once (in any order), each vector ``dims`` long and finite.
    Returns the rows in index order."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise BadReply("the reply has no data list")
    if len(data) != count:
        raise BadReply(f"the reply has {len(data)} vectors for {count} inputs")
    out = np.empty((count, dims), dtype=np.float32)
    seen = [False] * count
    for position, item in enumerate(data):
        if not isinstance(item, dict):
            raise BadReply(f"data[{position}] is not an object")
        index = item.get("index", position if count == 1 else None)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise BadReply(f"data[{position}].index is {index!r}, not 0 to {count - 1}")
        if seen[index]:
            raise BadReply(f"index {index} appears twice in the reply")
        seen[index] = True
        field_name = next((name for name in vector_fields if name in item), vector_fields[0])
        vector = decode_vector(item.get(field_name), f"data[{position}].{field_name}")
        if vector.shape != (dims,):
            raise BadReply(
                f"data[{position}] has {vector.shape[0] if vector.ndim else 0} dimensions, "
                f"expected {dims}"
            )
        out[index] = vector
    if not np.isfinite(out).all():
        raise BadReply("the reply holds a NaN or infinite value")
    return out


def usage_tokens(payload: Any, name: str) -> int | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    value = usage.get(name) if isinstance(usage, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _string(payload: Any, name: str) -> str | None:
    value = payload.get(name) if isinstance(payload, dict) else None
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
        return str(value)
    return None


def error_object(payload: Any) -> VendorFault:
    """``{"error": {"code", "message", "type"}}`` or the same fields at the top level
    (Qianfan's document lists them there)."""
    if not isinstance(payload, dict):
        return VendorFault()
    inner = payload.get("error")
    body = inner if isinstance(inner, dict) else payload
    message = _string(body, "message")
    if message is None and isinstance(inner, str):
        message = inner
    return VendorFault(
        code=_string(body, "code"),
        message=message,
        type=_string(body, "type"),
        request_id=_string(payload, "request_id") or _string(payload, "id"),
    )


def fixed_size(size: int) -> Dimensions:
    return Dimensions(default=size, minimum=size, maximum=size)


def require_dimensions(settings: VendorSettings, known: Mapping[str, int], title: str) -> int:
    """The model's vector size: configured, or known from the vendor's document."""
    if settings.dimensions is not None:
        return settings.dimensions
    size = known.get(settings.vendor_model.lower())
    if size is None:
        raise SettingError(
            "dimensions",
            f"is required: the size of {title} model {settings.vendor_model!r}'s vectors "
            "is not known to the gateway",
        )
    return size


def batch_limit(settings: VendorSettings, documented: int | None, title: str, default: int) -> int:
    """Inputs per vendor request: configured ``max_batch`` up to the documented limit."""
    if settings.max_batch is None:
        return documented if documented is not None else default
    if documented is not None and settings.max_batch > documented:
        raise SettingError(
            "max_batch",
            f"{title} model {settings.vendor_model!r} takes at most {documented} inputs per "
            f"request, not {settings.max_batch}",
        )
    return settings.max_batch


def dumps(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body)
