"""EmbedPipeline: results tagged with the caller's correlation ids, a failed request
that does not end the stream, and flow control (a bounded number of requests in
flight, however fast the caller sends), through a real server and channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import pytest_asyncio
from conftest import ScriptedProvider, expected_vector, unpack_status

from embedgate.client import AsyncClient, Client
from embedgate.server.config import ServerConfig
from embedgate.server.domain import Dimensions, EmbedOptions, Input, Modality, ModelInfo, TextInput
from embedgate.server.edge.server import Gateway
from embedgate.server.errors import Problem
from embedgate.server.providers.base import EmbedBatch
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

LIMIT = 3


@dataclass
class GatedModel:
    """A model whose calls wait at a gate the test opens, counting how many wait."""

    dims: int = 8
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    peak: int = 0
    calls: int = 0

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name="gated",
            provider="test",
            modalities=frozenset({Modality.TEXT}),
            max_inputs_per_call=64,
            dimensions=Dimensions(default=self.dims, minimum=1, maximum=self.dims),
            normalizes_by_default=False,
        )

    @property
    def max_batch(self) -> int:
        return 64

    @property
    def waiting(self) -> int:
        return 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        return []

    async def embed(self, inputs: Sequence[Input], options: EmbedOptions) -> EmbedBatch:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.gate.wait()
            return EmbedBatch(np.stack([expected_vector(item, self.dims) for item in inputs]))
        finally:
            self.in_flight -= 1


@dataclass
class Pipeline:
    gated: GatedModel
    scripted: ScriptedProvider
    stub: pb_grpc.EmbeddingServiceAsyncStub
    target: str


@pytest_asyncio.fixture
async def pipeline() -> AsyncIterator[Pipeline]:
    # Wide vectors: a reply of 16 of them is 256 KiB, more than HTTP/2's first window.
    gated = GatedModel(dims=4096)
    scripted = ScriptedProvider("scripted", dims=16, batch=4, fail_texts={"explode"})
    gateway = Gateway(
        Router([gated, scripted]),
        ServerConfig(host="127.0.0.1", port=0, pipeline_max_in_flight=LIMIT),
    )
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Pipeline(gated, scripted, pb_grpc.EmbeddingServiceStub(channel), f"127.0.0.1:{port}")
    gated.gate.set()
    await channel.close()
    await gateway.stop(grace=0.5)


def request(correlation_id: str, *words: str, model: str = "scripted") -> pb.EmbedPipelineRequest:
    return pb.EmbedPipelineRequest(
        correlation_id=correlation_id,
        request=pb.EmbedRequest(model=model, inputs=[pb.Input(text=w) for w in words]),
    )


async def test_each_result_carries_its_correlation_id(pipeline: Pipeline) -> None:
    """Twenty requests, each answered once with its own inputs' vectors; a request
    that fails gets its own error and the stream goes on."""
    sent = {f"doc-{n}": [f"word {n}", f"other {n}"] for n in range(20)}
    messages = [request(cid, *words) for cid, words in sent.items()]
    messages.insert(7, request("broken", "fine", "explode"))
    messages.insert(3, request("unknown-model", "x", model="nope"))
    call = pipeline.stub.EmbedPipeline(iter(messages), timeout=10)
    replies = {reply.correlation_id: reply async for reply in call}
    assert await call.code() == grpc.StatusCode.OK
    assert set(replies) == {*sent, "broken", "unknown-model"}
    for cid, words in sent.items():
        reply = replies[cid]
        assert reply.HasField("response")
        got = np.array([list(e.values) for e in reply.response.embeddings], dtype=np.float32)
        want = np.stack([expected_vector(TextInput(w), 16) * 2.0 for w in words])
        np.testing.assert_allclose(got, want, atol=1e-5)
    broken = unpack_status(replies["broken"].error)
    assert broken.code == grpc.StatusCode.UNAVAILABLE
    assert "explode" in broken.message
    unknown = unpack_status(replies["unknown-model"].error)
    assert unknown.code == grpc.StatusCode.NOT_FOUND


async def test_correlation_ids_are_required_and_unique_in_flight(pipeline: Pipeline) -> None:
    """A request without a correlation id, or with one still in flight, gets its own
    error (MISSING_FIELD, DUPLICATE_CORRELATION_ID) and the stream goes on; the first
    request with that id is answered."""
    pipeline.gated.gate.clear()

    async def messages() -> AsyncIterator[pb.EmbedPipelineRequest]:
        yield request("same", "a", model="gated")
        yield request("same", "b", model="gated")
        yield request("", "c", model="gated")

    call = pipeline.stub.EmbedPipeline(messages(), timeout=10)
    first = await call.read()
    second = await call.read()
    assert isinstance(first, pb.EmbedPipelineResponse)
    assert isinstance(second, pb.EmbedPipelineResponse)
    errors = {
        unpack_status(r.error).violation_reasons.get("correlation_id") for r in (first, second)
    }
    assert errors == {"DUPLICATE_CORRELATION_ID", "MISSING_FIELD"}
    pipeline.gated.gate.set()
    last = await call.read()
    assert isinstance(last, pb.EmbedPipelineResponse)
    assert last.correlation_id == "same"
    assert last.HasField("response")


async def test_requests_in_flight_are_bounded(pipeline: Pipeline) -> None:
    """The caller offers 40 requests at once and reads nothing: the model sees exactly
    LIMIT of them; when the gate opens, every one is answered, never more than LIMIT
    at a time."""
    gated = pipeline.gated
    gated.gate.clear()
    offered = 0

    async def messages() -> AsyncIterator[pb.EmbedPipelineRequest]:
        nonlocal offered
        for n in range(40):
            offered += 1
            yield request(f"r{n}", f"text {n}", model="gated")

    call = pipeline.stub.EmbedPipeline(messages(), timeout=20)
    for _ in range(100):
        if gated.in_flight == LIMIT:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # time for more to arrive, were the bound not held
    assert gated.in_flight == LIMIT
    assert gated.calls == LIMIT
    gated.gate.set()
    ids = [reply.correlation_id async for reply in call]
    assert sorted(ids) == sorted(f"r{n}" for n in range(40))
    assert gated.peak == LIMIT
    assert offered == 40


async def test_a_caller_that_does_not_read_stops_the_server_reading(pipeline: Pipeline) -> None:
    """Results not taken hold their slots: once the caller's receive window is full,
    the server cannot hand over more, so it reads no more requests, whatever the
    caller sends. Then reading lets everything through."""
    gated = pipeline.gated
    gated.gate.set()  # the model answers at once
    words = [f"w{n}" for n in range(16)]
    call = pipeline.stub.EmbedPipeline(
        iter([request(f"r{n}", *words, model="gated") for n in range(50)]), timeout=20
    )
    await asyncio.sleep(0.5)
    stalled = gated.calls
    await asyncio.sleep(0.3)
    assert gated.calls == stalled < 50
    ids = [reply.correlation_id async for reply in call]
    assert len(ids) == 50
    assert gated.calls == 50


async def test_the_python_clients_run_a_pipeline(pipeline: Pipeline) -> None:
    """The async and the blocking Python clients run a pipeline: one result per job, by
    its correlation id, with vectors of the output type asked for."""
    jobs = [(f"job-{n}", [f"a{n}", f"b{n}"]) for n in range(10)]
    async with AsyncClient(pipeline.target) as client:
        results = [
            r async for r in client.embed_pipeline(jobs, model="scripted", output_type="int8")
        ]
    assert sorted(r.correlation_id for r in results) == sorted(cid for cid, _ in jobs)
    for outcome in results:
        assert outcome.error is None
        assert outcome.result is not None
        assert outcome.result.vectors.shape == (2, 16)
        assert outcome.result.vectors.dtype == np.int8

    def blocking() -> list[str]:
        with Client(pipeline.target) as client:
            return [r.correlation_id for r in client.embed_pipeline(jobs, model="scripted")]

    assert sorted(await asyncio.to_thread(blocking)) == sorted(cid for cid, _ in jobs)


@pytest.mark.parametrize("limit", [0, 5000])
def test_the_in_flight_limit_is_validated(limit: int) -> None:
    """pipeline_max_in_flight outside its range is a configuration error naming it."""
    with pytest.raises(ValueError, match="pipeline_max_in_flight"):
        ServerConfig(pipeline_max_in_flight=limit)
