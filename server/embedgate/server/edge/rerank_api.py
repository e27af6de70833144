"""A rerank API in the shape Cohere, Jina and the multimodal relay share:
``POST /v1/rerank`` with ``model``, ``query``, ``documents``, ``top_n`` and
``return_documents``, answered with ``results[{index, relevance_score, document}]``,
best first, and ``usage``.

It is the gRPC ``Rerank`` (a vendor's reranker, or cosine similarity on any embedding
model), reached through the same admission, checks and access line (``protocol:
rerank``). A document may be a string or an input in the contract's JSON form (an
image, a text with an image...); errors are in the OpenAI shape the embeddings door
uses.
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from embedgate.server.edge.doors import DoorContext, Gate
from embedgate.server.edge.openai_api import (
    answer,
    bad_request,
    contract_input,
    optional_count,
    optional_text,
    usage,
)
from embedgate.server.errors import Reason
from embedgate.v1 import embedding_service_pb2 as pb

DOOR_NAME = "rerank"


def _documents(value: object) -> tuple[list[str], list[pb.Input]]:
    """The documents as the contract takes them: all strings go in ``documents``; any
    object makes every document an input (``document_inputs``)."""
    if value is None:
        raise bad_request("documents", "is required: an array of documents", Reason.MISSING_FIELD)
    if not isinstance(value, list):
        raise bad_request("documents", "must be an array of strings or input objects")
    if all(isinstance(item, str) for item in value):
        return [str(item) for item in value], []
    return [], [
        contract_input(item, f"documents[{position}]") for position, item in enumerate(value)
    ]


def rerank_request(body: object) -> pb.RerankRequest:
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    model, query = optional_text(body, "model"), optional_text(body, "query")
    texts, inputs = _documents(body.get("documents"))
    request = pb.RerankRequest(model=model, query=query, documents=texts, document_inputs=inputs)
    top_n = optional_count(body, "top_n", Reason.INVALID_TOP_N)
    if top_n is not None:
        request.top_n = top_n
    returned = body.get("return_documents", True)
    if not isinstance(returned, bool):
        raise bad_request("return_documents", "must be true or false")
    request.return_documents = returned
    user = body.get("user")
    if isinstance(user, str):
        request.user = user
    return request


def _document(result: pb.RerankResult) -> dict[str, Any] | None:
    if result.HasField("document"):
        return {"text": result.document}
    if result.HasField("document_input"):
        document: dict[str, Any] = json_format.MessageToDict(
            result.document_input, preserving_proto_field_name=True
        )
        return document
    return None


def _results(response: pb.RerankResponse) -> dict[str, Any]:
    results = []
    for result in response.results:
        entry: dict[str, Any] = {"index": result.index, "relevance_score": result.relevance_score}
        document = _document(result)
        if document is not None:
            entry["document"] = document
        results.append(entry)
    return {
        "id": response.request_id,
        "model": response.model,
        "results": results,
        "usage": usage(response),
    }


class RerankDoor:
    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._service = gate.service

    def routes(self) -> list[Route]:
        return [Route("/v1/rerank", self.rerank, methods=["POST"])]

    async def rerank(self, request: Request) -> Response:
        async def call(wanted: pb.RerankRequest, context: DoorContext) -> Any:
            return await self._service.Rerank(wanted, cast(Any, context))

        return await answer(
            request,
            self._gate,
            DOOR_NAME,
            "Rerank",
            rerank_request,
            call,
            lambda _wanted, response: _results(response),
        )
