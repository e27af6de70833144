"""Plain typed results, converted once from the response messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
import numpy.typing as npt

from embedgate.client._errors import EmbedgateError, error_from_status
from embedgate.client._inputs import InputLike, to_input
from embedgate.v1 import embedding_service_pb2 as pb

# A 64-frame video of 1 MiB frames must fit in a request, and 512 vectors of 4096
# dimensions in a response: the same limits the server uses.
MAX_REQUEST_BYTES = 72 * 1024 * 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
)


OutputType = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
"""How vectors come back (see ``OutputType`` in the contract for the scales)."""

Vector = npt.NDArray[Any]
"""One vector: float32, float16, int8 or uint8 values, or packed bits (binary: int8,
ubinary: uint8, ceil(dimensions / 8) bytes)."""

_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "binary": np.dtype(np.int8),
    "ubinary": np.dtype(np.uint8),
}


def _output_name(value: int) -> str:
    if value == pb.OUTPUT_TYPE_UNSPECIFIED:
        return "float32"
    return pb.OutputType.Name(value).removeprefix("OUTPUT_TYPE_").lower()


def vector_of(embedding: pb.Embedding, output_type: str) -> Vector:
    """An embedding as a numpy array of the type it was asked in."""
    if output_type == "float32":
        return np.array(embedding.values, dtype=np.float32)
    return np.frombuffer(embedding.data, dtype=_DTYPES[output_type])


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One vector per input, in the order of the inputs."""

    model: str
    # One row per input (a 2-D array), of the output type's dtype.
    vectors: Vector
    usage: Usage | None
    request_id: str
    # Which inputs' vectors came from the gateway's cache.
    cached: tuple[bool, ...] = ()
    output_type: str = "float32"


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One input's outcome in a stream: ``vector`` or ``error``, never both."""

    index: int
    vector: Vector | None
    error: EmbedgateError | None
    usage: Usage | None
    cached: bool = False


@dataclass(frozen=True, slots=True)
class RankedDocument:
    index: int
    relevance_score: float
    document: str | None
    # The document as given, when given as an input message and asked back.
    document_input: pb.Input | None = None
    cached: bool = False


@dataclass(frozen=True, slots=True)
class RerankResult:
    """Documents ordered by relevance, highest first."""

    model: str
    results: list[RankedDocument]
    method: str
    usage: Usage | None
    request_id: str
    query_cached: bool = False


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """One request's outcome in a pipeline: ``result`` or ``error``, never both."""

    correlation_id: str
    result: EmbedResult | None
    error: EmbedgateError | None


@dataclass(frozen=True, slots=True)
class Deployment:
    """One endpoint of a model served by several: ``state`` is ``in_service``,
    ``probing`` or ``out_of_service``."""

    name: str
    provider: str
    state: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    provider: str
    modalities: tuple[str, ...]
    max_inputs_per_call: int
    default_dimensions: int
    allowed_dimensions: tuple[int, ...]
    min_dimensions: int
    max_dimensions: int
    embeds: bool
    reranks: bool
    accepts_instruction: bool
    # The most characters one text (or the instruction) may have.
    max_text_chars: int = 0
    # The label of its vector space, when the server's configuration gives one.
    space: str = ""
    # Where its requests go, when several deployments serve it.
    deployments: tuple[Deployment, ...] = ()


class EmbedOptions(TypedDict, total=False):
    """Optional fields of an embed request (see ``EmbedRequest`` in the contract)."""

    instruction: str
    dimensions: int | None
    normalize: bool | None
    request_id: str
    user: str
    output_type: OutputType
    # Skip the gateway's cache for this call.
    no_cache: bool


class RerankOptions(TypedDict, total=False):
    """Optional fields of a rerank request (see ``RerankRequest`` in the contract)."""

    top_n: int | None
    return_documents: bool
    request_id: str
    user: str
    no_cache: bool


def embed_request(
    inputs: Iterable[InputLike], *, model: str, **options: Unpack[EmbedOptions]
) -> pb.EmbedRequest:
    request = pb.EmbedRequest(
        model=model,
        inputs=[to_input(item) for item in inputs],
        instruction=options.get("instruction", ""),
        request_id=options.get("request_id", ""),
        user=options.get("user", ""),
        output_type="OUTPUT_TYPE_" + options.get("output_type", "float32").upper(),
        no_cache=options.get("no_cache", False),
    )
    dimensions = options.get("dimensions")
    if dimensions is not None:
        request.dimensions = dimensions
    normalize = options.get("normalize")
    if normalize is not None:
        request.normalize = normalize
    return request


def rerank_request(
    query: str, documents: Sequence[InputLike], *, model: str, **options: Unpack[RerankOptions]
) -> pb.RerankRequest:
    """Texts go in ``documents``; if any document is an input message (an image, a
    video...), all go in ``document_inputs``."""
    texts = [doc for doc in documents if isinstance(doc, str)]
    request = pb.RerankRequest(
        model=model,
        query=query,
        return_documents=options.get("return_documents", False),
        request_id=options.get("request_id", ""),
        user=options.get("user", ""),
        no_cache=options.get("no_cache", False),
    )
    if len(texts) == len(documents):
        request.documents.extend(texts)
    else:
        request.document_inputs.extend(to_input(doc) for doc in documents)
    top_n = options.get("top_n")
    if top_n is not None:
        request.top_n = top_n
    return request


def _usage(message: pb.Usage) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens, total_tokens=message.total_tokens)


def embed_result(
    response: pb.EmbedResponse, output_type: int = pb.OUTPUT_TYPE_UNSPECIFIED
) -> EmbedResult:
    """``output_type``: the request's, which says how to read the vectors."""
    name = _output_name(output_type)
    rows = [vector_of(embedding, name) for embedding in response.embeddings]
    dtype = np.float32 if name == "float32" else _DTYPES[name]
    return EmbedResult(
        model=response.model,
        vectors=np.stack(rows) if rows else np.empty((0, 0), dtype=dtype),
        usage=_usage(response.usage) if response.HasField("usage") else None,
        request_id=response.request_id,
        cached=tuple(embedding.cached for embedding in response.embeddings),
        output_type=name,
    )


def stream_item(
    message: pb.StreamEmbedResponse, output_type: int = pb.OUTPUT_TYPE_UNSPECIFIED
) -> StreamItem:
    if message.HasField("error"):
        return StreamItem(message.index, None, error_from_status(message.error), None)
    return StreamItem(
        index=message.index,
        vector=vector_of(message.embedding, _output_name(output_type)),
        error=None,
        usage=_usage(message.usage) if message.HasField("usage") else None,
        cached=message.embedding.cached,
    )


def pipeline_result(
    message: pb.EmbedPipelineResponse, output_type: int = pb.OUTPUT_TYPE_UNSPECIFIED
) -> PipelineResult:
    if message.HasField("error"):
        return PipelineResult(message.correlation_id, None, error_from_status(message.error))
    return PipelineResult(message.correlation_id, embed_result(message.response, output_type), None)


def rerank_result(response: pb.RerankResponse) -> RerankResult:
    return RerankResult(
        model=response.model,
        results=[
            RankedDocument(
                index=r.index,
                relevance_score=r.relevance_score,
                document=r.document if r.HasField("document") else None,
                document_input=r.document_input if r.HasField("document_input") else None,
                cached=r.cached,
            )
            for r in response.results
        ],
        method=pb.RerankMethod.Name(response.method).removeprefix("RERANK_METHOD_").lower(),
        usage=_usage(response.usage) if response.HasField("usage") else None,
        request_id=response.request_id,
        query_cached=response.query_cached,
    )


def model_infos(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            provider=m.provider,
            modalities=tuple(
                pb.Modality.Name(x).removeprefix("MODALITY_").lower() for x in m.modalities
            ),
            max_inputs_per_call=m.max_inputs_per_call,
            default_dimensions=m.default_dimensions,
            allowed_dimensions=tuple(m.allowed_dimensions),
            min_dimensions=m.min_dimensions,
            max_dimensions=m.max_dimensions,
            embeds=m.embeds,
            reranks=m.reranks,
            accepts_instruction=m.accepts_instruction,
            max_text_chars=m.max_text_chars,
            space=m.space,
            deployments=tuple(
                Deployment(
                    d.name,
                    d.provider,
                    pb.DeploymentState.Name(d.state).removeprefix("DEPLOYMENT_STATE_").lower(),
                )
                for d in m.deployments
            ),
        )
        for m in response.models
    ]


def with_token(
    metadata: Sequence[tuple[str, str]], token: str | None
) -> tuple[tuple[str, str], ...]:
    """The metadata every call sends: the caller's, and the bearer token if any."""
    if token is None:
        return tuple(metadata)
    return (*metadata, ("authorization", f"Bearer {token}"))
