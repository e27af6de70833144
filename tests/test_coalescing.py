"""Concurrent calls merged into shared vendor requests: each caller gets exactly its
own vectors, and callers stay independent (cancelling, deadlines, failures)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from conftest import ScriptedProvider, rich_error
from fakes import Fault, fake_vector, item_key
from vendor_world import VendorWorld, embed, eventually, texts

from embedgate.server.domain import EmbedOptions, TextInput
from embedgate.server.routing.coalesce import CROWD_HALF_LIFE_S, Coalescer
from embedgate.v1 import embedding_service_pb2 as pb

MODEL = "openai-merge"  # 8 inputs per vendor request, batches wait up to 100 ms


def own_vector(response: pb.EmbedResponse, text: str, dims: int = 1536) -> None:
    np.testing.assert_allclose(
        np.array(response.embeddings[0].values), fake_vector(item_key(text=text), dims), atol=1e-6
    )


async def quiet() -> None:
    """Long enough without calls for the model to forget any crowd of earlier tests (the
    gateway is shared by the session)."""
    await asyncio.sleep(10 * CROWD_HALF_LIFE_S)


async def pacer(world: VendorWorld) -> asyncio.Future[pb.EmbedResponse]:
    """A call held at the vendor for half a second: while it is in flight, calls that
    follow it wait for company (up to the model's 100 ms) instead of leaving at once."""
    await quiet()
    fake = world.fakes["openai"]
    fake.plan(Fault.delay(0.5))
    before = len(fake.received)
    call = asyncio.ensure_future(embed(world, MODEL, texts("pacer")))
    await eventually(lambda: len(fake.received) == before + 1)
    return call


def after_pacer(world: VendorWorld) -> list[list[str]]:
    """The inputs of each vendor request but the pacer's."""
    return [r.body["input"] for r in world.fakes["openai"].received[1:]]


async def test_a_lone_call_leaves_at_once(world: VendorWorld) -> None:
    """With nothing else outstanding, a call does not wait the model's 100 ms for company
    that is not coming: it is answered at once, again and again."""
    await quiet()
    fake = world.fakes["openai"]
    took = []
    for position in range(6):
        started = time.monotonic()
        own_vector(await embed(world, MODEL, texts(f"alone {position}")), f"alone {position}")
        took.append(time.monotonic() - started)
    assert [len(r.body["input"]) for r in fake.received] == [1] * 6
    # The first may open the connection to the vendor; none waits out the window.
    assert max(took[1:]) < 0.05, took


async def test_concurrent_calls_share_vendor_requests(world: VendorWorld) -> None:
    """Sixteen one-text calls while another is in flight travel in two vendor requests
    of eight, and each caller gets the vector of its own text."""
    first = await pacer(world)
    values = [f"merge me {i}" for i in range(16)]
    responses = await asyncio.gather(*(embed(world, MODEL, texts(v)) for v in values))
    for value, response in zip(values, responses, strict=True):
        own_vector(response, value)
    own_vector(await first, "pacer")
    assert sorted(len(inputs) for inputs in after_pacer(world)) == [8, 8]


async def test_a_burst_shares_requests(world: VendorWorld) -> None:
    """Sixteen calls at once with nothing in flight share requests of the vendor's
    eight (the first may leave alone, and so may the next if the first was through
    before it came in: each of them was alone on the server)."""
    await quiet()
    values = [f"burst {i}" for i in range(16)]
    responses = await asyncio.gather(*(embed(world, MODEL, texts(v)) for v in values))
    for value, response in zip(values, responses, strict=True):
        own_vector(response, value)
    sizes = [len(r.body["input"]) for r in world.fakes["openai"].received]
    assert sum(sizes) == 16
    assert sum(size for size in sizes if size > 1) >= 12, sizes
    assert max(sizes) == 8


async def test_a_crowd_of_callers_shares_every_batch() -> None:
    """Four callers calling again as soon as they are answered: after the first call
    (alone, it leaves at once), the crowd is known and every batch carries all four."""
    provider = ScriptedProvider("m", batch=16)
    queue = Coalescer(provider, wait_s=0.02)

    async def caller(who: int) -> None:
        for turn in range(10):
            (future,) = queue.submit([TextInput(f"{who}-{turn}")], EmbedOptions())
            await future

    async with asyncio.timeout(5):
        await asyncio.gather(*(caller(who) for who in range(4)))
    await queue.close()
    assert sum(provider.calls) == 40
    assert provider.calls[0] in (1, 4)
    assert provider.calls[1:].count(4) >= 8, provider.calls


async def test_calls_with_different_options_are_not_merged(world: VendorWorld) -> None:
    """Calls asking for different sizes never share a vendor request."""
    first = await pacer(world)
    small = [embed(world, MODEL, texts(f"s{i}"), dimensions=256) for i in range(3)]
    large = [embed(world, MODEL, texts(f"l{i}"), dimensions=512) for i in range(3)]
    responses = await asyncio.gather(*small, *large)
    assert [len(r.embeddings[0].values) for r in responses] == [256] * 3 + [512] * 3
    for i, response in enumerate(responses[3:]):
        own_vector(response, f"l{i}", 512)
    await first
    bodies = [r.body for r in world.fakes["openai"].received[1:]]
    assert sorted((b["dimensions"], len(b["input"])) for b in bodies) == [(256, 3), (512, 3)]


async def test_a_shared_batch_gives_no_caller_the_others_tokens(world: VendorWorld) -> None:
    """A call alone in its vendor request is charged that request's tokens; calls that
    shared one are given no usage rather than a guess."""
    alone = await embed(world, MODEL, texts("alone"))
    assert alone.usage.total_tokens > 0
    first = await pacer(world)
    together = await asyncio.gather(*(embed(world, MODEL, texts(f"t{i}")) for i in range(2)))
    await first
    assert [len(r.body["input"]) for r in world.fakes["openai"].received] == [1, 1, 2]
    assert all(not response.HasField("usage") for response in together)


async def test_a_caller_cancelling_leaves_the_others_alone(world: VendorWorld) -> None:
    """One caller cancelling after the shared request left does not fail or cancel it
    for the others."""
    fake = world.fakes["openai"]
    first = await pacer(world)
    fake.always(Fault.delay(0.4))
    leaving = world.stub.Embed(pb.EmbedRequest(model=MODEL, inputs=texts("leaving")), timeout=10)
    staying = [embed(world, MODEL, texts(f"staying {i}")) for i in range(3)]
    tasks = [asyncio.ensure_future(call) for call in staying]
    await eventually(lambda: len(fake.received) == 2)
    leaving.cancel()
    responses = await asyncio.gather(*tasks)
    for i, response in enumerate(responses):
        own_vector(response, f"staying {i}")
    await first
    assert len(after_pacer(world)[0]) == 4
    assert fake.disconnects == 0


async def test_a_caller_gone_before_the_batch_left_is_not_sent(world: VendorWorld) -> None:
    """Inputs whose caller cancelled while they waited for company are dropped."""
    first = await pacer(world)
    leaving = world.stub.Embed(pb.EmbedRequest(model=MODEL, inputs=texts("never sent")), timeout=10)
    staying = asyncio.ensure_future(embed(world, MODEL, texts("sent")))
    await asyncio.sleep(0.02)  # both wait in the 100 ms queue
    leaving.cancel()
    own_vector(await staying, "sent")
    await first
    assert after_pacer(world) == [["sent"]]


async def test_a_short_deadline_fails_only_its_own_caller(world: VendorWorld) -> None:
    """A caller whose deadline passes while the shared request runs gets
    DEADLINE_EXCEEDED; the others in the same request get their vectors."""
    fake = world.fakes["openai"]
    first = await pacer(world)
    fake.always(Fault.delay(0.5))
    hurried = asyncio.ensure_future(embed(world, MODEL, texts("hurried"), deadline_s=0.3))
    patient = asyncio.ensure_future(embed(world, MODEL, texts("patient"), deadline_s=5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hurried
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    own_vector(await patient, "patient")
    await first
    assert [sorted(inputs) for inputs in after_pacer(world)] == [["hurried", "patient"]]
    assert fake.disconnects == 0


async def test_a_failed_shared_request_fails_each_caller_on_its_own_input(
    world: VendorWorld,
) -> None:
    """When the shared request fails, every caller in it gets the error, naming its own
    input."""
    fake = world.fakes["openai"]
    first = await pacer(world)
    fake.always(Fault.status(400))
    calls = [embed(world, MODEL, texts("x", f"y{i}")) for i in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    await first
    assert len(after_pacer(world)) == 1
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
