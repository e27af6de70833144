"""Protobuf requests → domain values, with every structural violation reported at once.

Model-specific checks (modalities, sizes, limits) belong to the routing layer; what is
checked here holds whatever the model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from embedgate.server.domain import (
    EmbedOptions,
    Image,
    ImageInput,
    Input,
    OutputType,
    TextImageInput,
    TextInput,
    VideoInput,
)
from embedgate.server.edge.images import KNOWN_FORMATS, canonical_media_type, sniff_image
from embedgate.server.errors import Violation, echo
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


_OUTPUT_TYPES = {
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
                "INVALID_REQUEST_ID",
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
            Violation("model", "is required: a model name from ListModels", "MISSING_FIELD")
        )


def _parse_image(image: pb.Image, path: str, violations: list[Violation]) -> Image | None:
    before = len(violations)
    mime = canonical_media_type(image.mime_type) if image.HasField("mime_type") else None
    if mime is not None and not mime.startswith("image/"):
        violations.append(
            Violation(
                f"{path}.mime_type",
                f"must be an image media type, not {echo(image.mime_type)!r}",
                "INVALID_IMAGE",
            )
        )
    which = image.WhichOneof("source")
    if which is None:
        violations.append(Violation(path, "has neither uri nor data: set one", "MISSING_FIELD"))
        return None
    if which == "uri":
        problem = uri_problem(image.uri)
        if problem is not None:
            violations.append(Violation(f"{path}.uri", problem, "INVALID_IMAGE_URI"))
        return None if len(violations) > before else Image(uri=image.uri, mime_type=mime)
    sniffed = sniff_image(image.data)
    if not image.data:
        violations.append(Violation(f"{path}.data", "is empty", "INVALID_IMAGE"))
    elif sniffed is None:
        violations.append(
            Violation(
                f"{path}.data", f"is not an image: expected {KNOWN_FORMATS} bytes", "INVALID_IMAGE"
            )
        )
    elif mime is not None and mime.startswith("image/") and mime != sniffed:
        violations.append(
            Violation(
                f"{path}.mime_type", f"says {mime} but the data is {sniffed}", "INVALID_IMAGE"
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
                path, "has no content: set one of text, image, video, text_image", "MISSING_FIELD"
            )
        )
        return None
    if which == "text":
        if not item.text.strip():
            violations.append(Violation(f"{path}.text", "is empty", "EMPTY_TEXT"))
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
                    "EMPTY_VIDEO",
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
        violations.append(Violation(f"{path}.text_image.text", "is empty", "EMPTY_TEXT"))
    if not pair.HasField("image"):
        violations.append(Violation(f"{path}.text_image.image", "is required", "MISSING_FIELD"))
        return None
    image = _parse_image(pair.image, f"{path}.text_image.image", violations)
    if image is None or len(violations) > before:
        return None
    return TextImageInput(pair.text, image)


def _options(request: pb.EmbedRequest, violations: list[Violation], header_id: str) -> EmbedOptions:
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions == 0:
        violations.append(
            Violation("dimensions", "must be at least 1 when set", "UNSUPPORTED_DIMENSIONS")
        )
        dimensions = None
    output_type = _OUTPUT_TYPES.get(request.output_type)
    if output_type is None:
        known = ", ".join(pb.OutputType.Name(n) for n in sorted(_OUTPUT_TYPES) if n)
        violations.append(
            Violation(
                "output_type",
                f"is {request.output_type}, not a known output type ({known})",
                "UNSUPPORTED_OUTPUT_TYPE",
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
        violations.append(Violation("inputs", "is empty: give at least one input", "MISSING_FIELD"))
    inputs = [_input_at(item, "inputs", i, violations) for i, item in enumerate(request.inputs)]
    options = _options(request, violations, header_id)
    return ParsedEmbed(request.model, inputs, options, violations)


def parse_rerank(request: pb.RerankRequest, header_id: str = "") -> ParsedRerank:
    violations: list[Violation] = []
    _check_model(request.model, violations)
    query: str | None = request.query
    if not request.query.strip():
        violations.append(Violation("query", "is empty", "EMPTY_TEXT"))
        query = None
    documents: list[Input | None] = []
    field = "document_inputs" if request.document_inputs else "documents"
    if request.documents and request.document_inputs:
        violations.append(
            Violation(
                "document_inputs",
                "is set as well as documents: give the documents one way",
                "CONFLICTING_FIELDS",
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
                "MISSING_FIELD",
            )
        )
    else:
        for i, doc in enumerate(request.documents):
            if doc.strip():
                documents.append(TextInput(doc))
            else:
                violations.append(Violation(f"documents[{i}]", "is empty", "EMPTY_TEXT", i))
                documents.append(None)
    top_n = request.top_n if request.HasField("top_n") else None
    if top_n == 0:
        violations.append(Violation("top_n", "must be at least 1 when set", "INVALID_TOP_N"))
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
