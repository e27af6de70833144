"""The cap on concurrent RPCs, and health that follows each model's vendor."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from conftest import rich_error
from fakes import FakeVendor, Fault, make_fake
from gateways import health_status, key_file, openai_model, running, samples, value
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

CAP = 3
WAVE = 10


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key="vendor-key-for-tests") as vendor:
        yield vendor


async def outcome(call: grpc.aio.UnaryUnaryCall[pb.EmbedRequest, pb.EmbedResponse]) -> str:
    """ "served", or "refused" when the call was refused for the cap (any other end is
    a failure of the test)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return overload_refusal(error)
    return "served"


def overload_refusal(error: grpc.aio.AioRpcError) -> str:
    rich = rich_error(error)
    if (rich.code, rich.reason) != (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"):
        raise AssertionError(f"not an overload refusal: {rich}")
    if rich.metadata != {"max_concurrent_rpcs": str(CAP)}:
        raise AssertionError(f"the refusal does not name the cap: {rich.metadata}")
    return "refused"


async def test_the_cap_holds_wave_after_wave(fake: FakeVendor, tmp_path: Path) -> None:
    """Two waves of slow calls, each larger than the cap: each time exactly the cap is
    served, the rest are refused at once, the vendor never sees more than the cap in
    flight, and health answers throughout."""
    model = openai_model(fake, key_file(tmp_path))
    async with (
        running([model], max_concurrent_rpcs=CAP, metrics_port=0) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for wave in range(2):
            fake.reset()
            fake.always(Fault.delay(0.6))
            loop = asyncio.get_running_loop()
            started = loop.time()
            calls = [
                stub.Embed(
                    pb.EmbedRequest(model="m", inputs=[pb.Input(text=f"wave {wave} call {i}")]),
                    timeout=10,
                )
                for i in range(WAVE)
            ]
            refusals = [asyncio.ensure_future(outcome(call)) for call in calls]
            done, _ = await asyncio.wait(refusals, timeout=0.4)
            # Refused calls end long before the served ones' vendor replies.
            assert sorted(task.result() for task in done) == ["refused"] * (WAVE - CAP)
            assert loop.time() - started < 0.6
            assert await health_status(channel) == "SERVING"  # probes pass at the cap
            results = Counter(await asyncio.gather(*refusals))
            assert results == {"served": CAP, "refused": WAVE - CAP}
            assert fake.max_in_flight == CAP
            assert len(fake.received) == CAP
        assert gateway.metrics_port
        found = samples(gateway.metrics.exposition().decode())
    assert value(found, "embedgate_rpcs_rejected_total", reason="overload") == 2 * (WAVE - CAP)
    assert (
        value(
            found,
            "embedgate_rpcs_total",
            method="Embed",
            model="m",
            code="OK",
            protocol="grpc",
        )
        == 2 * CAP
    )


async def test_streams_count_against_the_cap_until_they_end(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """A StreamEmbed holds one of max_concurrent_rpcs places until it ends: while it
    runs, another call over the cap is RESOURCE_EXHAUSTED; after it ends, calls go
    through again."""
    fake.always(Fault.delay(0.5))
    async with (
        running([openai_model(fake, key_file(tmp_path))], max_concurrent_rpcs=1) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedRequest(model="m", inputs=[pb.Input(text="one")])
        stream = stub.StreamEmbed(pb.StreamEmbedRequest(request=request), timeout=10)
        for _ in range(500):  # until the stream holds the one place, at most 5 s
            if fake.in_flight:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len([reply async for reply in stream]) == 1
        # Its place is given back when it ends.
        fake.always(None)
        reply = await stub.Embed(request, timeout=10)
        assert len(reply.embeddings) == 1


async def test_a_refused_key_turns_the_model_not_serving_until_a_call_succeeds(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """A key the vendor refuses fails the call FAILED_PRECONDITION and turns that model's
    health NOT_SERVING (the server and the other models stay SERVING) until a call
    succeeds; a model name the server does not have is NOT_FOUND."""
    keys = key_file(tmp_path)
    models = [openai_model(fake, keys), openai_model(fake, keys, name="other")]
    async with (
        running(models) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedRequest(model="m", inputs=[pb.Input(text="x")])
        assert await health_status(channel, "m") == "SERVING"
        fake.api_key = "rotated-by-the-vendor"  # the gateway's key is now refused
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await health_status(channel, "m") == "NOT_SERVING"
        # The server and the other model are fine.
        assert await health_status(channel) == "SERVING"
        assert await health_status(channel, "embedgate.v1.EmbeddingService") == "SERVING"
        assert await health_status(channel, "other") == "SERVING"
        fake.api_key = "vendor-key-for-tests"
        await stub.Embed(request, timeout=5)
        assert await health_status(channel, "m") == "SERVING"
        # An unknown name is unknown, not serving.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health_status(channel, "no-such-model")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_repeated_vendor_failures_turn_the_model_not_serving(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """unhealthy_after_failures calls in a row that fail for the vendor's sake (after
    their retries); failures that are the caller's own (a 400) do not count."""
    model = openai_model(fake, key_file(tmp_path), max_retries=0)
    async with (
        running([model], unhealthy_after_failures=3) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        watch = health_watch(channel, "m")
        assert await anext(watch) == "SERVING"

        async def fail(fault: Fault) -> None:
            fake.plan(fault)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Embed(pb.EmbedRequest(model="m", inputs=[pb.Input(text="x")]), timeout=5)

        for fault in (Fault.status(503), Fault.reset(), Fault.status(400), Fault.malformed()):
            await fail(fault)
        # 503, reset, (400: the caller's), malformed reply: 3 in a row.
        assert await asyncio.wait_for(anext(watch), 5) == "NOT_SERVING"
        await stub.Embed(pb.EmbedRequest(model="m", inputs=[pb.Input(text="y")]), timeout=5)
        assert await asyncio.wait_for(anext(watch), 5) == "SERVING"
        # Two failures, then a success: the count starts again.
        for fault in (Fault.status(502), Fault.status(500)):
            await fail(fault)
        await stub.Embed(pb.EmbedRequest(model="m", inputs=[pb.Input(text="z")]), timeout=5)
        await fail(Fault.status(503))
        assert await health_status(channel, "m") == "SERVING"
        found = samples(gateway.metrics.exposition().decode())
        await watch.aclose()
    assert value(found, "embedgate_model_serving", model="m") == 1


async def health_watch(channel: grpc.aio.Channel, service: str) -> AsyncGenerator[str]:
    stub = health_pb2_grpc.HealthStub(channel)
    async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30):
        yield health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
