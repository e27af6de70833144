"""Concurrent calls merged into shared vendor requests: each caller gets exactly its
own vectors, and callers stay independent (cancelling, deadlines, failures)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from conftest import rich_error
from fakes import Fault, fake_vector, item_key
from vendor_world import VendorWorld, embed, eventually, texts

from embedgate.v1 import embedding_service_pb2 as pb

MODEL = "openai-merge"  # 8 inputs per vendor request, batches wait 100 ms for company


def own_vector(response: pb.EmbedResponse, text: str, dims: int = 1536) -> None:
    np.testing.assert_allclose(
        np.array(response.embeddings[0].values), fake_vector(item_key(text=text), dims), atol=1e-6
    )


async def test_concurrent_calls_share_vendor_requests(world: VendorWorld) -> None:
    """Sixteen one-text calls at once travel in two vendor requests of eight, and each
    caller gets the vector of its own text."""
    values = [f"merge me {i}" for i in range(16)]
    responses = await asyncio.gather(*(embed(world, MODEL, texts(v)) for v in values))
    for value, response in zip(values, responses, strict=True):
        own_vector(response, value)
    fake = world.fakes["openai"]
    assert sorted(len(r.body["input"]) for r in fake.received) == [8, 8]


async def test_calls_with_different_options_are_not_merged(world: VendorWorld) -> None:
    """Calls asking for different sizes never share a vendor request."""
    small = [embed(world, MODEL, texts(f"s{i}"), dimensions=256) for i in range(3)]
    large = [embed(world, MODEL, texts(f"l{i}"), dimensions=512) for i in range(3)]
    responses = await asyncio.gather(*small, *large)
    assert [len(r.embeddings[0].values) for r in responses] == [256] * 3 + [512] * 3
    for i, response in enumerate(responses[3:]):
        own_vector(response, f"l{i}", 512)
    bodies = [r.body for r in world.fakes["openai"].received]
    assert sorted((b["dimensions"], len(b["input"])) for b in bodies) == [(256, 3), (512, 3)]


async def test_a_shared_batch_gives_no_caller_the_others_tokens(world: VendorWorld) -> None:
    """A call alone in its vendor request is charged that request's tokens; calls that
    shared one are given no usage rather than a guess."""
    alone = await embed(world, MODEL, texts("alone"))
    assert alone.usage.total_tokens > 0
    together = await asyncio.gather(*(embed(world, MODEL, texts(f"t{i}")) for i in range(2)))
    assert len(world.fakes["openai"].received) == 2
    assert all(not response.HasField("usage") for response in together)


async def test_a_caller_cancelling_leaves_the_others_alone(world: VendorWorld) -> None:
    """One caller cancelling after the shared request left does not fail or cancel it
    for the others."""
    fake = world.fakes["openai"]
    fake.always(Fault.delay(0.4))
    leaving = world.stub.Embed(pb.EmbedRequest(model=MODEL, inputs=texts("leaving")), timeout=10)
    staying = [embed(world, MODEL, texts(f"staying {i}")) for i in range(3)]
    tasks = [asyncio.ensure_future(call) for call in staying]
    await eventually(lambda: len(fake.received) == 1)
    leaving.cancel()
    responses = await asyncio.gather(*tasks)
    for i, response in enumerate(responses):
        own_vector(response, f"staying {i}")
    assert len(fake.received[0].body["input"]) == 4
    assert fake.disconnects == 0


async def test_a_caller_gone_before_the_batch_left_is_not_sent(world: VendorWorld) -> None:
    """Inputs whose caller cancelled while they waited for company are dropped."""
    fake = world.fakes["openai"]
    leaving = world.stub.Embed(pb.EmbedRequest(model=MODEL, inputs=texts("never sent")), timeout=10)
    staying = asyncio.ensure_future(embed(world, MODEL, texts("sent")))
    await asyncio.sleep(0.02)  # both wait in the 100 ms queue
    leaving.cancel()
    own_vector(await staying, "sent")
    assert [r.body["input"] for r in fake.received] == [["sent"]]


async def test_a_short_deadline_fails_only_its_own_caller(world: VendorWorld) -> None:
    """A caller whose deadline passes while the shared request runs gets
    DEADLINE_EXCEEDED; the others in the same request get their vectors."""
    fake = world.fakes["openai"]
    fake.always(Fault.delay(0.5))
    hurried = asyncio.ensure_future(embed(world, MODEL, texts("hurried"), deadline_s=0.3))
    patient = asyncio.ensure_future(embed(world, MODEL, texts("patient"), deadline_s=5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hurried
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    own_vector(await patient, "patient")
    assert [sorted(r.body["input"]) for r in fake.received] == [["hurried", "patient"]]
    assert fake.disconnects == 0


async def test_a_failed_shared_request_fails_each_caller_on_its_own_input(
    world: VendorWorld,
) -> None:
    """When the shared request fails, every caller in it gets the error, naming its own
    input."""
    fake = world.fakes["openai"]
    fake.always(Fault.status(400))
    calls = [embed(world, MODEL, texts("x", f"y{i}")) for i in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert len(fake.received) == 1
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        error = rich_error(result)
        assert error.reason == "VENDOR_REJECTED_REQUEST"
        assert error.metadata["input_index"] == "0"


async def test_no_wait_means_no_merging(world: VendorWorld) -> None:
    """A model with coalescing off (coalesce_wait_ms: 0) sends each call on its own."""
    await asyncio.gather(*(embed(world, "openai-quick", texts(f"solo {i}")) for i in range(4)))
    received = world.fakes["openai"].received
    assert sorted(len(r.body["input"]) for r in received) == [1, 1, 1, 1]
