"""The OpenAI embeddings API: ``POST /v1/embeddings`` and ``GET /v1/models``.

A door onto the gRPC service, not a second engine: each request becomes the contract's
``EmbedRequest`` (or ``ListModelsRequest``) and goes through the same service, with the
same admission (bearer token, model scopes, the cap on calls at once), checks, vendors,
cache, coalescing, deadlines and access line (``protocol: openai``). Errors come back in
OpenAI's shape with the HTTP status of the gRPC code, the embedgate reason in ``code``
and the field the error blames in ``param``, as the caller named it (``input[2]`` for
what the contract calls ``inputs[2]``).

Extensions, documented in the README: an ``input`` item may be an object in the
contract's JSON form (``{"image": {"uri": ...}}``, ``{"text_image": ...}``,
``{"video": ...}``), and ``output_type`` asks for compact vectors as ``Embed`` does.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from embedgate.server.edge.access import DOOR
from embedgate.server.edge.convert import OUTPUT_TYPES
from embedgate.server.edge.doors import (
    BodyMeter,
    DoorAbortedError,
    DoorContext,
    Gate,
    admitted,
    echoed,
    metadata_of,
    refusal,
    refused_line,
)
from embedgate.server.errors import InvalidRequestError, Reason, RequestTooLargeError, Violation
from embedgate.v1 import embedding_service_pb2 as pb

DOOR_NAME = "openai"
JSON = "application/json"

# gRPC code → (HTTP status, OpenAI's error type).
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "request_cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_SERVER_ERROR = (500, "server_error")

# output_type by the names the domain gives the contract's types ("int8"...).
_OUTPUT_TYPES: dict[str, int] = {
    domain.value: number for number, domain in OUTPUT_TYPES.items() if number
}
# How each compact type's bytes read as numbers, for encoding_format "float".
_DTYPES: dict[int, np.dtype[Any]] = {
    pb.OUTPUT_TYPE_FLOAT16: np.dtype("<f2"),
    pb.OUTPUT_TYPE_INT8: np.dtype("i1"),
    pb.OUTPUT_TYPE_UINT8: np.dtype("u1"),
    pb.OUTPUT_TYPE_BINARY: np.dtype("i1"),
    pb.OUTPUT_TYPE_UBINARY: np.dtype("u1"),
}
_FLOAT32 = np.dtype("<f4")


def bad_request(
    field: str, description: str, reason: Reason = Reason.INVALID_REQUEST
) -> InvalidRequestError:
    return InvalidRequestError([Violation(field, description, reason)])


def contract_input(item: object, field: str) -> pb.Input:
    """One item of an input array: a string is a text; an object is an input in the
    contract's JSON form (``{"image": {"uri": ...}}``)."""
    if isinstance(item, str):
        return pb.Input(text=item)
    if not isinstance(item, dict):
        raise bad_request(field, "must be a string or an input object")
    try:
        return json_format.ParseDict(item, pb.Input())
    except json_format.ParseError as error:
        raise bad_request(field, f"is not an input in the contract's JSON form ({error})") from None


def optional_text(body: dict[str, Any], name: str) -> str:
    """A string field of the body; absent: empty (the service says if it is required)."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(name, "must be a string")
    return value or ""


def optional_count(body: dict[str, Any], name: str, reason: Reason) -> int | None:
    """A positive integer field of the body, or None when it is absent."""
    value = body.get(name)
    if value is not None and (type(value) is not int or not 0 < value < 2**32):
        raise bad_request(name, "must be a positive integer", reason)
    return value


def usage(response: pb.EmbedResponse | pb.RerankResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.usage.prompt_tokens,
        "total_tokens": response.usage.total_tokens,
    }


def _inputs(value: object) -> list[pb.Input]:
    """``input`` as the contract's inputs: a string, or an array of strings or of inputs
    in the contract's JSON form."""
    if value is None:
        raise bad_request(
            "input", "is required: a string, or an array of them", Reason.MISSING_FIELD
        )
    if isinstance(value, str):
        return [pb.Input(text=value)]
    if not isinstance(value, list):
        raise bad_request("input", "must be a string or an array of strings")
    inputs = []
    for position, item in enumerate(value):
        if isinstance(item, int | list):
            raise bad_request(
                f"input[{position}]" if isinstance(item, list) else "input",
                "holds token ids; this gateway takes texts (each model counts its own "
                "tokens): send the text itself",
            )
        inputs.append(contract_input(item, f"input[{position}]"))
    return inputs


def _embed_request(body: object) -> tuple[pb.EmbedRequest, str]:
    """The ``EmbedRequest`` an OpenAI body asks for, and the encoding it wants back."""
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request(
            "encoding_format", f"must be 'float' or 'base64', not {str(encoding)[:40]!r}"
        )
    model = optional_text(body, "model")
    request = pb.EmbedRequest(model=model, inputs=_inputs(body.get("input")))
    dimensions = optional_count(body, "dimensions", Reason.INVALID_REQUEST)
    if dimensions is not None:
        request.dimensions = dimensions
    user = body.get("user")
    if isinstance(user, str):
        request.user = user
    output_type = body.get("output_type")
    if output_type is not None:
        if output_type not in _OUTPUT_TYPES:
            raise bad_request(
                "output_type",
                f"must be one of {', '.join(_OUTPUT_TYPES)}",
                Reason.UNSUPPORTED_OUTPUT_TYPE,
            )
        request.output_type = _OUTPUT_TYPES[output_type]  # type: ignore[assignment]
    return request, encoding


def _vector(embedding: pb.Embedding, output_type: int, encoding: str) -> object:
    if output_type in _DTYPES:
        if encoding == "base64":
            return base64.b64encode(embedding.data).decode()
        return np.frombuffer(embedding.data, dtype=_DTYPES[output_type])
    values = np.asarray(embedding.values, dtype=_FLOAT32)
    if encoding == "base64":  # little-endian float32, as the SDK decodes it
        return base64.b64encode(values.tobytes()).decode()
    return values


def _embedding_list(response: pb.EmbedResponse, output_type: int, encoding: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": embedding.index,
                "embedding": _vector(embedding, output_type, encoding),
            }
            for embedding in response.embeddings
        ],
        "model": response.model,
        "usage": usage(response),
    }


# Contract field names → the names the HTTP callers used for them.
_CALLERS_NAMES = (("inputs", "input"), ("document_inputs", "documents"))


def _param(field: str) -> str:
    """A contract field path as the HTTP caller named it (``input[2]`` for what the
    contract calls ``inputs[2]``)."""
    for contract, theirs in _CALLERS_NAMES:
        if field == contract or field.startswith((contract + "[", contract + ".")):
            return theirs + field[len(contract) :]
    return field


def json_response(status: int, content: object, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, headers=headers, media_type=JSON)


def error_response(aborted: DoorAbortedError) -> Response:
    """A failed call in OpenAI's error shape."""
    if aborted.reason == Reason.REQUEST_TOO_LARGE:
        status, kind = 413, "invalid_request_error"
    else:
        status, kind = _HTTP.get(aborted.code, _SERVER_ERROR)
    fields = aborted.fields
    headers = echoed(aborted.metadata)
    retry_after = aborted.retry_after_s
    if retry_after is not None:
        headers["retry-after"] = str(max(1, round(retry_after + 0.499)))
    error = {
        "message": aborted.message,
        "type": kind,
        "param": _param(fields[0]) if fields else None,
        "code": aborted.reason,
    }
    return json_response(status, {"error": error}, headers)


W = TypeVar("W")


async def _body(request: Request, gate: Gate) -> bytes:
    """The request's body, refused once it is larger than the server reads (before any
    of it is read, when its length is declared)."""
    meter = BodyMeter(gate, request.headers.get("content-length", ""))
    if meter.over:
        raise gate.too_large()
    chunks = []
    async for chunk in request.stream():
        if not meter.took(chunk):
            raise gate.too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def _wanted(request: Request, gate: Gate, read: Callable[[object], W]) -> W:
    """What the body asks the service for (``read`` of its JSON)."""
    try:
        body = orjson.loads(await _body(request, gate))
    except orjson.JSONDecodeError as error:
        raise bad_request("body", f"is not JSON ({error})") from None
    return read(body)


async def answer(
    request: Request,
    gate: Gate,
    door: str,
    method: str,
    read: Callable[[object], W] | None,
    call: Callable[[W, DoorContext], Awaitable[Any]],
    render: Callable[[W, Any], object],
) -> Response:
    """One call through a JSON door: its body read into what the service takes (``read``;
    None: a call without a body), admitted and served as an RPC, and the service's answer
    or error rendered as JSON. The access line names ``door``."""
    token = DOOR.set(door)
    try:
        wanted: Any = None
        if read is not None:
            try:
                wanted = await _wanted(request, gate, read)
            except (InvalidRequestError, RequestTooLargeError) as bad:
                refused_line(method, gate.metrics, bad)
                raise refusal(bad) from None
        context = DoorContext(metadata_of(request.headers.raw))
        with admitted(gate, method, context):
            response = await call(wanted, context)
    except DoorAbortedError as aborted:
        return error_response(aborted)
    except ClientDisconnect:  # gone before its body was read: no one to answer
        return Response(status_code=499)
    finally:
        DOOR.reset(token)
    return json_response(200, render(wanted, response), echoed(context.trailing))


class OpenAIDoor:
    """The routes, bound to the service and the guard the gRPC server uses."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._service = gate.service

    def routes(self) -> list[Route]:
        return [
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]

    async def embeddings(self, request: Request) -> Response:
        async def call(wanted: tuple[pb.EmbedRequest, str], context: DoorContext) -> Any:
            return await self._service.Embed(wanted[0], cast(Any, context))

        def render(wanted: tuple[pb.EmbedRequest, str], response: Any) -> object:
            embed, encoding = wanted
            return _embedding_list(response, embed.output_type, encoding)

        return await answer(request, self._gate, DOOR_NAME, "Embed", _embed_request, call, render)

    async def models(self, request: Request) -> Response:
        async def call(_wanted: None, context: DoorContext) -> Any:
            return await self._service.ListModels(pb.ListModelsRequest(), cast(Any, context))

        return await answer(request, self._gate, DOOR_NAME, "ListModels", None, call, _model_list)


def _model_list(_wanted: None, listing: pb.ListModelsResponse) -> object:
    data = []
    for model in listing.models:
        described = json_format.MessageToDict(model, preserving_proto_field_name=True)
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": model.provider or "embedgate",
                "embedgate": described,
            }
        )
    return {"object": "list", "data": data}
