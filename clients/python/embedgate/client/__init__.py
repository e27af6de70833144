"""embedgate's Python client: typed, sync (:class:`Client`) and async (:class:`AsyncClient`).

>>> with Client("localhost:50051") as client:
...     vectors = client.embed_texts(["two apples"], model="all-minilm-l6-v2")

Inputs are plain strings (text) or messages built with :func:`text`, :func:`image_uri`,
:func:`image_bytes`, :func:`video` and :func:`text_image`. Failures raise
:class:`EmbedgateError` subclasses carrying the status code and the unpacked details.
"""

from embedgate.client._async import AsyncClient
from embedgate.client._errors import (
    DeadlineExceededError,
    EmbedgateError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_status,
)
from embedgate.client._inputs import InputLike, image_bytes, image_uri, text, text_image, video
from embedgate.client._sync import Client
from embedgate.client._types import (
    Deployment,
    EmbedResult,
    ModelInfo,
    OutputType,
    PipelineResult,
    RankedDocument,
    RerankResult,
    StreamItem,
    Usage,
    Vector,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "Deployment",
    "EmbedResult",
    "EmbedgateError",
    "FailedPreconditionError",
    "FieldViolation",
    "InputLike",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "OutputType",
    "PermissionDeniedError",
    "PipelineResult",
    "RankedDocument",
    "RequestCancelledError",
    "RerankResult",
    "ResourceExhaustedError",
    "StreamItem",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "Vector",
    "error_from_status",
    "image_bytes",
    "image_uri",
    "text",
    "text_image",
    "video",
]
