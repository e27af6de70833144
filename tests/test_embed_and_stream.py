"""Embed is all or nothing and keeps the caller's order; StreamEmbed reports each input
as it completes and a failed input without ending the stream; the message size limits
hold the documented payloads."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from conftest import (
    LOCAL,
    MULTI,
    PNG_1X1,
    TEXT_ONLY,
    WIDE,
    LocalServed,
    ScriptedProvider,
    Served,
    embed_error,
    expected_vector,
    unpack_status,
)

from embedgate.server.config import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES
from embedgate.server.domain import TextInput
from embedgate.v1 import embedding_service_pb2 as pb


async def settled(provider: ScriptedProvider, within_s: float = 2.5) -> bool:
    """Whether the provider has no batch running, waiting up to ``within_s``."""
    for _ in range(int(within_s / 0.05)):
        if provider.in_flight == 0:
            return True
        await asyncio.sleep(0.05)
    return provider.in_flight == 0


def texts(n: int, prefix: str = "item") -> list[pb.Input]:
    return [pb.Input(text=f"{prefix} {i}") for i in range(n)]


async def test_embed_splits_batches_and_keeps_the_callers_order(served: Served) -> None:
    """10 inputs on a 4-per-batch model go as 4+4+2 and come back in input order with the
    right vector for each input (later batches finish first)."""
    served.multi.calls.clear()
    served.multi.slow_down(0.2)
    try:
        response = await served.stub.Embed(
            pb.EmbedRequest(model=MULTI, inputs=texts(10)), timeout=30
        )
    finally:
        served.multi.slow_down(0.0)
    assert sorted(served.multi.calls) == [2, 4, 4]
    assert [e.index for e in response.embeddings] == list(range(10))
    for i, embedding in enumerate(response.embeddings):
        # The test model does not normalise by default: its vectors are twice unit length.
        want = expected_vector(TextInput(f"item {i}"), 16) * 2
        np.testing.assert_allclose(np.array(embedding.values), want, atol=1e-5)


async def test_embed_fails_whole_naming_the_failed_input(served: Served) -> None:
    """One failed input fails the call; the status names that input; nothing partial."""
    inputs = texts(4, "ok") + texts(4, "more") + [pb.Input(text="explode")]
    error = await embed_error(served.stub, pb.EmbedRequest(model=MULTI, inputs=inputs))
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.reason == "MODEL_UNAVAILABLE"
    assert error.metadata["input_index"] == "8"
    assert error.message.startswith("inputs[8]")


async def test_stream_reports_every_input_once_with_its_own_vector(served: Served) -> None:
    """StreamEmbed yields one message per input, each carrying its index and vector."""
    request = pb.StreamEmbedRequest(
        request=pb.EmbedRequest(model=MULTI, inputs=texts(9), request_id="s-1")
    )
    seen = {}
    async for message in served.stub.StreamEmbed(request, timeout=30):
        assert message.WhichOneof("result") == "embedding"
        assert message.embedding.index == message.index
        assert message.model == MULTI
        assert message.request_id == "s-1"
        seen[message.index] = np.array(message.embedding.values)
    assert sorted(seen) == list(range(9))
    for i, vector in seen.items():
        np.testing.assert_allclose(
            vector, expected_vector(TextInput(f"item {i}"), 16) * 2, atol=1e-5
        )


async def test_stream_delivers_in_completion_order(served: Served) -> None:
    """Results are sent as they complete: a later, faster batch may arrive first."""
    served.multi.calls.clear()
    served.multi.slow_down(0.3)
    try:
        request = pb.StreamEmbedRequest(request=pb.EmbedRequest(model=MULTI, inputs=texts(8)))
        order = [m.index async for m in served.stub.StreamEmbed(request, timeout=30)]
    finally:
        served.multi.slow_down(0.0)
    assert sorted(order) == list(range(8))
    # Batch 1 (inputs 0-3) sleeps 0.3 s, batch 2 (4-7) 0.15 s: the second comes first.
    assert order[:4] == [4, 5, 6, 7]


async def test_stream_reports_a_failed_input_and_goes_on(served: Served) -> None:
    """A failed batch yields a google.rpc.Status for each of its inputs; others succeed."""
    inputs = [*texts(4, "fine"), pb.Input(text="explode"), *texts(2, "after")]
    request = pb.StreamEmbedRequest(request=pb.EmbedRequest(model=MULTI, inputs=inputs))
    results = {m.index: m async for m in served.stub.StreamEmbed(request, timeout=30)}
    assert sorted(results) == list(range(7))
    for i in range(4):
        assert results[i].WhichOneof("result") == "embedding"
    for i in (4, 5, 6):  # the failing input shares its batch with inputs 5 and 6
        assert results[i].WhichOneof("result") == "error"
        error = unpack_status(results[i].error)
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert error.reason == "MODEL_UNAVAILABLE"
        assert error.metadata["input_index"] == str(i)
        assert error.message.startswith(f"inputs[{i}]")


async def test_stream_validation_failure_ends_the_call(served: Served) -> None:
    """Invalid requests fail StreamEmbed up front, with the same details as Embed."""
    request = pb.StreamEmbedRequest(
        request=pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text="")])
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in served.stub.StreamEmbed(request, timeout=30):
            pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.local
async def test_stream_on_the_local_model(local_served: LocalServed) -> None:
    """The local model streams too, with a token count per input."""
    request = pb.StreamEmbedRequest(request=pb.EmbedRequest(model=LOCAL, inputs=texts(3)))
    messages = [m async for m in local_served.stub.StreamEmbed(request, timeout=60)]
    assert sorted(m.index for m in messages) == [0, 1, 2]
    assert all(len(m.embedding.values) == 384 for m in messages)
    assert all(m.usage.prompt_tokens > 0 for m in messages)


async def test_a_64_frame_video_of_1_mib_frames_fits_in_a_request(served: Served) -> None:
    """The request limit admits a 64-frame video of 1 MiB frames."""
    frame = PNG_1X1 + b"\x00" * (1024 * 1024 - len(PNG_1X1))
    request = pb.EmbedRequest(
        model=MULTI, inputs=[pb.Input(video=pb.Video(frames=[pb.Image(data=frame)] * 64))]
    )
    assert request.ByteSize() < DEFAULT_MAX_REQUEST_BYTES
    response = await served.stub.Embed(request, timeout=60)
    assert len(response.embeddings) == 1


async def test_512_vectors_of_4096_dimensions_fit_in_a_response(served: Served) -> None:
    """The response limit admits 512 vectors of 4096 dimensions."""
    response = await served.stub.Embed(pb.EmbedRequest(model=WIDE, inputs=texts(512)), timeout=60)
    assert len(response.embeddings) == 512
    assert all(len(e.values) == 4096 for e in response.embeddings)
    assert response.ByteSize() < DEFAULT_MAX_RESPONSE_BYTES


async def test_dimensions_apply_to_any_model_with_a_range(served: Served) -> None:
    """dimensions and normalize are applied the same way for every provider."""
    response = await served.stub.Embed(
        pb.EmbedRequest(model=MULTI, inputs=texts(1), dimensions=5, normalize=True), timeout=30
    )
    values = np.array(response.embeddings[0].values)
    full = expected_vector(TextInput("item 0"), 16)
    np.testing.assert_allclose(values, full[:5] / np.linalg.norm(full[:5]), atol=1e-5)


async def test_list_models_describes_each_model(served: Served) -> None:
    """ListModels reports name, provider, modalities, limits and dimensions."""
    response = await served.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    models = {m.name: m for m in response.models}
    assert list(models) == [TEXT_ONLY, MULTI, WIDE]
    text = models[TEXT_ONLY]
    assert text.provider == "test"
    assert list(text.modalities) == [pb.MODALITY_TEXT]
    assert text.max_inputs_per_call == 512
    assert text.default_dimensions == 384
    assert (text.min_dimensions, text.max_dimensions) == (1, 384)
    assert list(text.allowed_dimensions) == []
    assert (text.embeds, text.reranks, text.accepts_instruction) == (True, True, False)
    assert list(models[MULTI].modalities) == [
        pb.MODALITY_TEXT,
        pb.MODALITY_IMAGE,
        pb.MODALITY_VIDEO,
        pb.MODALITY_TEXT_IMAGE,
    ]


async def test_the_request_id_comes_back_on_failures_and_streams(served: Served) -> None:
    """The caller's request id comes back in the x-request-id trailer of a call that
    fails and of a stream."""
    bad = pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text=" ")], request_id="req-bad")
    call = served.stub.Embed(bad, timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert ("x-request-id", "req-bad") in tuple(caught.value.trailing_metadata() or ())
    stream = served.stub.StreamEmbed(
        pb.StreamEmbedRequest(
            request=pb.EmbedRequest(
                model=TEXT_ONLY, inputs=[pb.Input(text="x")], request_id="req-s"
            )
        ),
        timeout=60,
    )
    assert len([message async for message in stream]) == 1
    assert ("x-request-id", "req-s") in tuple(await stream.trailing_metadata())


async def test_a_passed_deadline_cancels_the_model_work(served: Served) -> None:
    """When the caller's deadline passes, the call ends DEADLINE_EXCEEDED and the model
    work it started is cancelled, not left running."""
    served.multi.slow_down(30.0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.stub.Embed(pb.EmbedRequest(model=MULTI, inputs=texts(2)), timeout=0.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert await settled(served.multi)
    finally:
        served.multi.slow_down(0)


async def test_a_cancelled_stream_cancels_the_model_work(served: Served) -> None:
    """A caller that walks away from a stream cancels the batches still running."""
    served.multi.slow_down(30.0)
    try:
        call = served.stub.StreamEmbed(
            pb.StreamEmbedRequest(request=pb.EmbedRequest(model=MULTI, inputs=texts(8))), timeout=60
        )
        await asyncio.sleep(0.3)
        assert served.multi.in_flight == 2
        call.cancel()
        assert await settled(served.multi)
    finally:
        served.multi.slow_down(0)
