"""Protobuf ↔ domain values: the one place the contract's messages are read and made.

Requests become domain values with every structural violation reported at once
(model-specific checks, such as modalities, sizes and limits, belong to routing); results
become responses (vectors through ``wire.py``, which writes their bytes directly).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from google.rpc import status_pb2

from embedgate.server.domain import (
    DeploymentState,
    EmbedOptions,
    Image,
    ImageInput,
    Input,
    Modality,
    ModelInfo,
    OutputType,
    TextImageInput,
    TextInput,
    Usage,
    VideoInput,
)
from embedgate.server.edge.images import KNOWN_FORMATS, canonical_media_type, sniff_image
from embedgate.server.edge.wire import embedding_bytes, embeddings_field
from embedgate.server.errors import Reason, Violation, echo
from embedgate.server.routing.embedding import EmbedResult, Encoded
from embedgate.server.routing.rerank import RerankResult
from embedgate.v1 import embedding_service_pb2 as pb


@dataclass(frozen=True, slots=True)
class ParsedEmbed:
    """An Embed request as domain values. ``inputs[i]`` is None where input ``i`` broke
    a rule (listed in ``violations``)."""

    model: str
    inputs: list[Input | None]
    options: EmbedOptions
    violations: list[Violation]


@dataclass(frozen=True, slots=True)
class ParsedRerank:
    """A Rerank request as domain values. The documents come from ``field``
    (``documents`` or ``document_inputs``); ``None`` where one broke a rule."""

    model: str
    query: str | None
    documents: list[Input | None]
    field: str
    top_n: int | None
    return_documents: bool
    options: EmbedOptions
    violations: list[Violation]


# The contract's output types as the domain names them.
OUTPUT_TYPES = {
    pb.OUTPUT_TYPE_UNSPECIFIED: OutputType.FLOAT32,
    pb.OUTPUT_TYPE_FLOAT32: OutputType.FLOAT32,
    pb.OUTPUT_TYPE_FLOAT16: OutputType.FLOAT16,
    pb.OUTPUT_TYPE_INT8: OutputType.INT8,
    pb.OUTPUT_TYPE_UINT8: OutputType.UINT8,
    pb.OUTPUT_TYPE_BINARY: OutputType.BINARY,
    pb.OUTPUT_TYPE_UBINARY: OutputType.UBINARY,
}


MAX_REQUEST_ID_CHARS = 128
# Printable ASCII without spaces: the id travels in vendor HTTP headers and log lines.
_REQUEST_ID = re.compile(r"[\x21-\x7e]+")


def request_id_or_new(given: str, header: str, violations: list[Violation]) -> str:
    """The caller's request id (the request's field, else its ``x-request-id``
    metadata), or a new one: 128 random bits as 32 hex digits."""
    field = "request_id" if given else "x-request-id (metadata)"
    given = given or header
    if not given:
        return os.urandom(16).hex()
    if len(given) > MAX_REQUEST_ID_CHARS or not _REQUEST_ID.fullmatch(given):
        violations.append(
            Violation(
                field,
                f"must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces",
                Reason.INVALID_REQUEST_ID,
            )
        )
        return os.urandom(16).hex()
    return given


# Longer than any URL a browser or an HTTP server takes (they stop near 8 KiB).
MAX_URI_CHARS = 8192
# RFC 3986 has no spaces or control characters in a URI.
_URI_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


def uri_problem(uri: str) -> str | None:
    """What is wrong with an image URI the gateway passes to a vendor, or None. It must
    be an absolute http(s) URL that parses: the vendor fetches it, the gateway never."""
    if len(uri) > MAX_URI_CHARS:
        return f"is {len(uri)} characters long; at most {MAX_URI_CHARS}"
    if _URI_FORBIDDEN.search(uri):
        return "has a space or a control character: percent-encode it"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - a port out of range or not a number raises here
    except ValueError as exc:  # e.g. "https://[::1/x.png": an unclosed IPv6 bracket
        return f"is not a valid URL ({echo(str(exc))})"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "must be an absolute http or https URL"
    return None


def _check_model(model: str, violations: list[Violation]) -> None:
    if not model:
        violations.append(
            Violation("model", "is required: a model name from ListModels", Reason.MISSING_FIELD)
        )


def _parse_image(image: pb.Image, path: str, violations: list[Violation]) -> Image | None:
    before = len(violations)
    mime = canonical_media_type(image.mime_type) if image.HasField("mime_type") else None
    if mime is not None and not mime.startswith("image/"):
        violations.append(
            Violation(
                f"{path}.mime_type",
                f"must be an image media type, not {echo(image.mime_type)!r}",
                Reason.INVALID_IMAGE,
            )
        )
    which = image.WhichOneof("source")
    if which is None:
        violations.append(
            Violation(path, "has neither uri nor data: set one", Reason.MISSING_FIELD)
        )
        return None
    if which == "uri":
        problem = uri_problem(image.uri)
        if problem is not None:
            violations.append(Violation(f"{path}.uri", problem, Reason.INVALID_IMAGE_URI))
        return None if len(violations) > before else Image(uri=image.uri, mime_type=mime)
    sniffed = sniff_image(image.data)
    if not image.data:
        violations.append(Violation(f"{path}.data", "is empty", Reason.INVALID_IMAGE))
    elif sniffed is None:
        violations.append(
            Violation(
                f"{path}.data",
                f"is not an image: expected {KNOWN_FORMATS} bytes",
                Reason.INVALID_IMAGE,
            )
        )
    elif mime is not None and mime.startswith("image/") and mime != sniffed:
        violations.append(
            Violation(
                f"{path}.mime_type", f"says {mime} but the data is {sniffed}", Reason.INVALID_IMAGE
            )
        )
    if len(violations) > before:
        return None
    return Image(data=image.data, mime_type=mime or sniffed)


def _input_at(item: pb.Input, field: str, index: int, violations: list[Violation]) -> Input | None:
    """Input ``index`` of repeated field ``field``; its violations carry its index."""
    before = len(violations)
    parsed = _parse_input(item, f"{field}[{index}]", violations)
    violations[before:] = [replace(v, index=index) for v in violations[before:]]
    return parsed


def _parse_input(item: pb.Input, path: str, violations: list[Violation]) -> Input | None:
    before = len(violations)
    which = item.WhichOneof("content")
    if which is None:
        violations.append(
            Violation(
                path,
                "has no content: set one of text, image, video, text_image",
                Reason.MISSING_FIELD,
            )
        )
        return None
    if which == "text":
        if not item.text.strip():
            violations.append(Violation(f"{path}.text", "is empty", Reason.EMPTY_TEXT))
            return None
        return TextInput(item.text)
    if which == "image":
        image = _parse_image(item.image, f"{path}.image", violations)
        return None if image is None else ImageInput(image)
    if which == "video":
        if not item.video.frames:
            violations.append(
                Violation(
                    f"{path}.video.frames",
                    "is empty: a video needs at least one frame",
                    Reason.EMPTY_VIDEO,
                )
            )
            return None
        frames = [
            _parse_image(frame, f"{path}.video.frames[{n}]", violations)
            for n, frame in enumerate(item.video.frames)
        ]
        if len(violations) > before:
            return None
        return VideoInput(tuple(frame for frame in frames if frame is not None))
    # text_image
    pair = item.text_image
    if not pair.text.strip():
        violations.append(Violation(f"{path}.text_image.text", "is empty", Reason.EMPTY_TEXT))
    if not pair.HasField("image"):
        violations.append(
            Violation(f"{path}.text_image.image", "is required", Reason.MISSING_FIELD)
        )
        return None
    image = _parse_image(pair.image, f"{path}.text_image.image", violations)
    if image is None or len(violations) > before:
        return None
    return TextImageInput(pair.text, image)


def _options(request: pb.EmbedRequest, violations: list[Violation], header_id: str) -> EmbedOptions:
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions == 0:
        violations.append(
            Violation("dimensions", "must be at least 1 when set", Reason.UNSUPPORTED_DIMENSIONS)
        )
        dimensions = None
    output_type = OUTPUT_TYPES.get(request.output_type)
    if output_type is None:
        known = ", ".join(pb.OutputType.Name(n) for n in sorted(OUTPUT_TYPES) if n)
        violations.append(
            Violation(
                "output_type",
                f"is {request.output_type}, not a known output type ({known})",
                Reason.UNSUPPORTED_OUTPUT_TYPE,
            )
        )
    return EmbedOptions(
        instruction=request.instruction,
        dimensions=dimensions,
        normalize=request.normalize if request.HasField("normalize") else None,
        request_id=request_id_or_new(request.request_id, header_id, violations),
        user=request.user,
        output_type=output_type or OutputType.FLOAT32,
        cache=not request.no_cache,
    )


def parse_embed(request: pb.EmbedRequest, header_id: str = "") -> ParsedEmbed:
    """``header_id``: the call's ``x-request-id`` metadata, used when the request's
    own ``request_id`` is empty."""
    violations: list[Violation] = []
    _check_model(request.model, violations)
    if not request.inputs:
        violations.append(
            Violation("inputs", "is empty: give at least one input", Reason.MISSING_FIELD)
        )
    inputs = [_input_at(item, "inputs", i, violations) for i, item in enumerate(request.inputs)]
    options = _options(request, violations, header_id)
    return ParsedEmbed(request.model, inputs, options, violations)


def parse_rerank(request: pb.RerankRequest, header_id: str = "") -> ParsedRerank:
    violations: list[Violation] = []
    _check_model(request.model, violations)
    query: str | None = request.query
    if not request.query.strip():
        violations.append(Violation("query", "is empty", Reason.EMPTY_TEXT))
        query = None
    documents: list[Input | None] = []
    field = "document_inputs" if request.document_inputs else "documents"
    if request.documents and request.document_inputs:
        violations.append(
            Violation(
                "document_inputs",
                "is set as well as documents: give the documents one way",
                Reason.CONFLICTING_FIELDS,
            )
        )
    elif request.document_inputs:
        documents = [
            _input_at(item, "document_inputs", i, violations)
            for i, item in enumerate(request.document_inputs)
        ]
    elif not request.documents:
        violations.append(
            Violation(
                "documents",
                "is empty: give at least one document (as documents or document_inputs)",
                Reason.MISSING_FIELD,
            )
        )
    else:
        for i, doc in enumerate(request.documents):
            if doc.strip():
                documents.append(TextInput(doc))
            else:
                violations.append(Violation(f"documents[{i}]", "is empty", Reason.EMPTY_TEXT, i))
                documents.append(None)
    top_n = request.top_n if request.HasField("top_n") else None
    if top_n == 0:
        violations.append(Violation("top_n", "must be at least 1 when set", Reason.INVALID_TOP_N))
        top_n = None
    options = EmbedOptions(
        request_id=request_id_or_new(request.request_id, header_id, violations),
        user=request.user,
        cache=not request.no_cache,
    )
    return ParsedRerank(
        request.model,
        query,
        documents,
        field,
        top_n,
        request.return_documents,
        options,
        violations,
    )


# -- domain → protobuf ------------------------------------------------------------------

_MODALITIES = {
    Modality.TEXT: pb.MODALITY_TEXT,
    Modality.IMAGE: pb.MODALITY_IMAGE,
    Modality.VIDEO: pb.MODALITY_VIDEO,
    Modality.TEXT_IMAGE: pb.MODALITY_TEXT_IMAGE,
}
_DEPLOYMENT_STATES = {
    DeploymentState.IN_SERVICE: pb.DEPLOYMENT_STATE_IN_SERVICE,
    DeploymentState.PROBING: pb.DEPLOYMENT_STATE_PROBING,
    DeploymentState.OUT_OF_SERVICE: pb.DEPLOYMENT_STATE_OUT_OF_SERVICE,
}
_RERANK_METHODS = {
    "vendor": pb.RERANK_METHOD_VENDOR,
    "embedding_cosine": pb.RERANK_METHOD_EMBEDDING_COSINE,
}


def usage_message(usage: Usage | None) -> pb.Usage | None:
    if usage is None:
        return None
    return pb.Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens)


def model_info_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        provider=info.provider,
        modalities=[_MODALITIES[m] for m in Modality if m in info.modalities],
        max_inputs_per_call=info.max_inputs_per_call,
        default_dimensions=info.dimensions.default,
        allowed_dimensions=list(info.dimensions.allowed),
        min_dimensions=info.dimensions.minimum,
        max_dimensions=info.dimensions.maximum,
        embeds=info.embeds,
        reranks=info.reranks,
        accepts_instruction=info.accepts_instruction,
        max_text_chars=info.max_text_chars,
        space=info.space,
        deployments=[
            pb.Deployment(
                name=deployment.name,
                provider=deployment.provider,
                state=_DEPLOYMENT_STATES[deployment.state],
            )
            for deployment in info.deployments
        ],
    )


def models_response(models: Iterable[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_info_message(info) for info in models])


def fill_embed_response(
    response: pb.EmbedResponse, result: EmbedResult, options: EmbedOptions
) -> None:
    response.model = result.model
    response.request_id = options.request_id
    usage = usage_message(result.usage)
    if usage is not None:
        response.usage.CopyFrom(usage)
    response.MergeFromString(
        embeddings_field(
            ((index, item.payload, item.cached) for index, item in enumerate(result.items)),
            floats=options.output_type is OutputType.FLOAT32,
        )
    )


def stream_message(
    index: int, item: Encoded, model: str, options: EmbedOptions
) -> pb.StreamEmbedResponse:
    """One input's vector as a ``StreamEmbed`` message."""
    message = pb.StreamEmbedResponse(index=index, model=model, request_id=options.request_id)
    message.embedding.MergeFromString(
        embedding_bytes(
            index,
            item.payload,
            floats=options.output_type is OutputType.FLOAT32,
            cached=item.cached,
        )
    )
    if item.tokens is not None:
        message.usage.prompt_tokens = item.tokens
        message.usage.total_tokens = item.tokens
    return message


def stream_failure(
    index: int, status: status_pb2.Status, model: str, options: EmbedOptions
) -> pb.StreamEmbedResponse:
    """One input's failure (its ``google.rpc.Status``) as a ``StreamEmbed`` message."""
    return pb.StreamEmbedResponse(
        index=index, model=model, request_id=options.request_id, error=status
    )


def rerank_response(
    result: RerankResult, request: pb.RerankRequest, options: EmbedOptions
) -> pb.RerankResponse:
    """The ranking, each document given back as the request gave it when asked."""
    response = pb.RerankResponse(
        model=result.model,
        request_id=options.request_id,
        usage=usage_message(result.usage),
        method=_RERANK_METHODS[result.method],
        query_cached=result.query_cached,
    )
    for ranked in result.ranked:
        item = response.results.add(
            index=ranked.index, relevance_score=ranked.score, cached=ranked.cached
        )
        if not request.return_documents:
            continue
        if request.document_inputs:
            item.document_input.CopyFrom(request.document_inputs[ranked.index])
        else:
            item.document = request.documents[ranked.index]
    return response
