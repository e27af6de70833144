"""Plain typed results, converted once from the response messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

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


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One vector per input, in the order of the inputs."""

    model: str
    vectors: list[list[float]]
    usage: Usage | None
    request_id: str


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One input's outcome in a stream: ``vector`` or ``error``, never both."""

    index: int
    vector: list[float] | None
    error: EmbedgateError | None
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class RankedDocument:
    index: int
    relevance_score: float
    document: str | None


@dataclass(frozen=True, slots=True)
class RerankResult:
    """Documents ordered by relevance, highest first."""

    model: str
    results: list[RankedDocument]
    method: str
    usage: Usage | None
    request_id: str


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


class EmbedOptions(TypedDict, total=False):
    """Optional fields of an embed request (see ``EmbedRequest`` in the contract)."""

    instruction: str
    dimensions: int | None
    normalize: bool | None
    request_id: str
    user: str


class RerankOptions(TypedDict, total=False):
    """Optional fields of a rerank request (see ``RerankRequest`` in the contract)."""

    top_n: int | None
    return_documents: bool
    request_id: str
    user: str


def embed_request(
    inputs: Iterable[InputLike], *, model: str, **options: Unpack[EmbedOptions]
) -> pb.EmbedRequest:
    request = pb.EmbedRequest(
        model=model,
        inputs=[to_input(item) for item in inputs],
        instruction=options.get("instruction", ""),
        request_id=options.get("request_id", ""),
        user=options.get("user", ""),
    )
    dimensions = options.get("dimensions")
    if dimensions is not None:
        request.dimensions = dimensions
    normalize = options.get("normalize")
    if normalize is not None:
        request.normalize = normalize
    return request


def rerank_request(
    query: str, documents: Sequence[str], *, model: str, **options: Unpack[RerankOptions]
) -> pb.RerankRequest:
    request = pb.RerankRequest(
        model=model,
        query=query,
        documents=list(documents),
        return_documents=options.get("return_documents", False),
        request_id=options.get("request_id", ""),
        user=options.get("user", ""),
    )
    top_n = options.get("top_n")
    if top_n is not None:
        request.top_n = top_n
    return request


def _usage(message: pb.Usage) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens, total_tokens=message.total_tokens)


def embed_result(response: pb.EmbedResponse) -> EmbedResult:
    vectors = [list(embedding.values) for embedding in response.embeddings]
    return EmbedResult(
        model=response.model,
        vectors=vectors,
        usage=_usage(response.usage) if response.HasField("usage") else None,
        request_id=response.request_id,
    )


def stream_item(message: pb.StreamEmbedResponse) -> StreamItem:
    if message.HasField("error"):
        return StreamItem(message.index, None, error_from_status(message.error), None)
    return StreamItem(
        index=message.index,
        vector=list(message.embedding.values),
        error=None,
        usage=_usage(message.usage) if message.HasField("usage") else None,
    )


def rerank_result(response: pb.RerankResponse) -> RerankResult:
    return RerankResult(
        model=response.model,
        results=[
            RankedDocument(
                index=r.index,
                relevance_score=r.relevance_score,
                document=r.document if r.HasField("document") else None,
            )
            for r in response.results
        ],
        method=pb.RerankMethod.Name(response.method).removeprefix("RERANK_METHOD_").lower(),
        usage=_usage(response.usage) if response.HasField("usage") else None,
        request_id=response.request_id,
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
        )
        for m in response.models
    ]
