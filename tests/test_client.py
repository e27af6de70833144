"""The typed Python client, sync and async, against the real server; its errors carry
the status code and the unpacked details."""

from __future__ import annotations

import asyncio
import threading

import grpc
import grpc_testing
import numpy as np
import pytest
from conftest import MULTI, PNG_1X1, TEXT_ONLY, Served, expected_vector, ranking
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from embedgate import client as eg
from embedgate.server.domain import TextInput
from embedgate.v1 import embedding_service_pb2 as pb


async def test_async_client_embeds_texts(served: Served) -> None:
    """embed_texts returns one 384-value vector per text, in order: each text's own."""
    given = ["two apples", "a pair of apples"]
    async with eg.AsyncClient(served.target) as client:
        vectors = await client.embed_texts(given, model=TEXT_ONLY)
    assert [len(v) for v in vectors] == [384, 384]
    for text, vector in zip(given, vectors, strict=True):
        np.testing.assert_allclose(vector, expected_vector(TextInput(text), 384), atol=1e-6)


async def test_async_client_embeds_every_input_kind(served: Served) -> None:
    """embed takes strings and built inputs of every kind; results keep their order."""
    inputs: list[eg.InputLike] = [
        "plain text",
        eg.text("built text"),
        eg.image_uri("https://example.test/a.png"),
        eg.image_bytes(PNG_1X1, mime_type="image/png"),
        eg.video([PNG_1X1, "https://example.test/f2.png"]),
        eg.text_image("a cat", PNG_1X1),
    ]
    async with eg.AsyncClient(served.target) as client:
        result = await client.embed(
            inputs, model=MULTI, request_id="typed-1", dimensions=8, normalize=True
        )
    assert result.model == MULTI
    assert result.request_id == "typed-1"
    assert len(result.vectors) == 6
    assert all(len(v) == 8 for v in result.vectors)
    assert result.usage == eg.Usage(prompt_tokens=6, total_tokens=6)


async def test_async_client_raises_typed_errors_with_details(served: Served) -> None:
    """An invalid request raises InvalidArgumentError with reason and field violations."""
    async with eg.AsyncClient(served.target) as client:
        with pytest.raises(eg.InvalidArgumentError) as caught:
            await client.embed(["ok", ""], model=TEXT_ONLY)
        error = caught.value
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "EMPTY_TEXT"
        assert error.domain == "embedgate"
        assert error.field_violations == (
            eg.FieldViolation("inputs[1].text", "is empty", "EMPTY_TEXT"),
        )
        with pytest.raises(eg.NotFoundError) as missing:
            await client.embed_texts(["x"], model="missing")
        assert missing.value.reason == "MODEL_NOT_FOUND"


async def test_async_client_streams_and_reports_failed_inputs(served: Served) -> None:
    """stream_embed yields each input once; a failed input carries a typed error."""
    async with eg.AsyncClient(served.target) as client:
        items = [
            item async for item in client.stream_embed(["a", "b", "c", "d", "explode"], model=MULTI)
        ]
    by_index = {item.index: item for item in items}
    assert sorted(by_index) == [0, 1, 2, 3, 4]
    assert all(by_index[i].vector is not None and by_index[i].error is None for i in range(4))
    failed = by_index[4]
    assert failed.vector is None
    assert isinstance(failed.error, eg.UnavailableError)
    assert failed.error.input_index == 4


async def test_async_client_reranks_and_lists_models(served: Served) -> None:
    """rerank returns the documents best first; list_models describes the models."""
    documents = ["stock report", "a pair of apples", "the weather in Oslo"]
    best_first = ranking(served.text, "two apples", documents)
    assert best_first != sorted(best_first), "documents already in order prove nothing"
    async with eg.AsyncClient(served.target) as client:
        ranked = await client.rerank(
            "two apples", documents, model=TEXT_ONLY, return_documents=True
        )
        models = await client.list_models()
    assert [r.index for r in ranked.results] == best_first
    assert [r.document for r in ranked.results] == [documents[i] for i in best_first]
    assert ranked.method == "embedding_cosine"
    text = next(m for m in models if m.name == TEXT_ONLY)
    assert text.modalities == ("text",)
    assert text.default_dimensions == 384


async def test_async_client_honours_its_deadline(served: Served) -> None:
    """A call that outlives its timeout raises DeadlineExceededError."""
    served.multi.slow_down(2.0)
    try:
        async with eg.AsyncClient(served.target, timeout=0.3) as client:
            with pytest.raises(eg.DeadlineExceededError):
                await client.embed_texts(["slow"], model=MULTI)
    finally:
        served.multi.slow_down(0.0)


async def test_sync_client_works_end_to_end(served: Served) -> None:
    """The blocking client embeds, streams, reranks, lists and raises typed errors."""

    def use() -> None:
        with eg.Client(served.target) as client:
            assert [len(v) for v in client.embed_texts(["two apples"], model=TEXT_ONLY)] == [384]
            streamed = sorted(
                item.index for item in client.stream_embed(["a", "b", "c"], model=MULTI)
            )
            assert streamed == [0, 1, 2]
            (best,) = client.rerank("q", ["a", "b"], model=TEXT_ONLY, top_n=1).results
            assert best.index == ranking(served.text, "q", ["a", "b"])[0]
            assert TEXT_ONLY in [m.name for m in client.list_models()]
            with pytest.raises(eg.InvalidArgumentError) as caught:
                client.embed([eg.image_uri("ftp://nope")], model=MULTI)
            assert caught.value.field_violations[0].field == "inputs[0].image.uri"

    # The server lives on this event loop: block in a thread, not on the loop.
    await asyncio.to_thread(use)


def test_sync_client_unpacks_retry_info_from_any_server() -> None:
    """RESOURCE_EXHAUSTED with RetryInfo becomes ResourceExhaustedError.retry_delay
    (played through grpcio-testing's channel, standing in for the server)."""
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"]
    channel = grpc_testing.channel([service], grpc_testing.strict_real_time())
    client = eg.Client(channel=channel)
    outcome: dict[str, BaseException] = {}

    def call() -> None:
        try:
            client.embed_texts(["x"], model="m")
        except eg.EmbedgateError as error:
            outcome["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    _, request, rpc = channel.take_unary_unary(service.methods_by_name["Embed"])
    assert request.model == "m"
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
    info = error_details_pb2.ErrorInfo(reason="VENDOR_RATE_LIMITED", domain="embedgate")
    details = [any_pb2.Any(), any_pb2.Any()]
    details[0].Pack(info)
    details[1].Pack(retry)
    status = status_pb2.Status(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="slow down", details=details
    )
    rpc.terminate(
        None,
        (("grpc-status-details-bin", status.SerializeToString()),),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "slow down",
    )
    thread.join(10)
    error = outcome["error"]
    assert isinstance(error, eg.ResourceExhaustedError)
    assert error.retry_delay == 3.0
    assert error.reason == "VENDOR_RATE_LIMITED"


def test_client_exports_are_pinned() -> None:
    """The public names of embedgate.client are exactly these."""
    assert sorted(eg.__all__) == sorted(
        [
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
    )
    for name in eg.__all__:
        assert hasattr(eg, name)
