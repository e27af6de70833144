"""The vector cache, through real gRPC in front of the loopback vendor fakes: what is a
hit and what is not, the per-call opt-out, identical inputs in flight sent once, the
byte bound and the TTL, the shared Redis tier (a real redis-server on loopback), and
rerank through the cache, over texts and over images."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import redis
from conftest import PNG_1X1
from fakes import FakeVendor, Fault, fake_vector, item_key, make_fake
from gateways import free_port
from redis_server import RedisServer
from vendor_world import eventually, rows, texts

from embedgate.server.app import build_gateway
from embedgate.server.edge.server import Gateway
from embedgate.server.providers.registry import parse_config
from embedgate.server.routing.cache import REDIS_PREFIX
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

DIMS = 64
CAT = "https://images.example/cat.png"
DOG = "https://images.example/dog.png"


@dataclass
class Replica:
    gateway: Gateway
    channel: grpc.aio.Channel
    stub: pb_grpc.EmbeddingServiceAsyncStub

    async def close(self) -> None:
        await self.channel.close()
        await self.gateway.stop(grace=0.5)


@dataclass
class Fakes:
    openai: FakeVendor
    relay: FakeVendor

    def reset(self) -> None:
        self.openai.reset()
        self.relay.reset()

    def inputs_sent(self, fake: FakeVendor | None = None) -> list[Any]:
        """Every input the vendor received, request after request."""
        fake = fake or self.openai
        sent: list[Any] = []
        for received in fake.received:
            sent.extend(received.body["input"])
        return sent


def models(fakes: Fakes) -> list[dict[str, Any]]:
    fast = {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_retries": 1}
    return [
        {
            "name": "oa",
            "provider": "openai",
            "vendor_model": "text-embedding-3-small",
            "base_url": fakes.openai.base_url,
            "max_batch": 16,
            "dimensions": DIMS,
            "coalesce_wait_ms": 0,
            **fast,
        },
        {
            "name": "oa-wait",  # a long wait: concurrent calls meet before anything is sent
            "provider": "openai",
            "vendor_model": "text-embedding-3-small",
            "base_url": fakes.openai.base_url,
            "max_batch": 16,
            "dimensions": DIMS,
            "coalesce_wait_ms": 80,
            **fast,
        },
        {
            "name": "clip",
            "provider": "aggregator",
            "vendor_model": "jina-clip-v2",
            "base_url": fakes.relay.base_url,
            "dimensions": 32,
            "coalesce_wait_ms": 0,
            **fast,
        },
        {
            "name": "reranker",
            "provider": "aggregator",
            "vendor_model": "bge-reranker-v2-m3",
            "task": "rerank",
            "base_url": fakes.relay.base_url,
            **fast,
        },
    ]


async def start_replica(fakes: Fakes, cache: dict[str, Any]) -> Replica:
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "default_deadline_s": 5.0},
            "cache": cache,
            "models": models(fakes),
        }
    )
    gateway = build_gateway(config)
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Replica(gateway, channel, pb_grpc.EmbeddingServiceStub(channel))


@pytest_asyncio.fixture(scope="module")
async def fakes() -> AsyncIterator[Fakes]:
    openai = make_fake("openai", api_key=None, dims=DIMS)
    relay = make_fake("aggregator", api_key=None, dims=32)
    await openai.start()
    await relay.start()
    yield Fakes(openai, relay)
    await openai.close()
    await relay.close()


@pytest_asyncio.fixture
async def replica(fakes: Fakes) -> AsyncIterator[Replica]:
    """A gateway with the default cache, empty at the start of each test."""
    fakes.reset()
    replica = await start_replica(fakes, {})
    yield replica
    await replica.close()


async def embed(
    replica: Replica, inputs: Sequence[pb.Input], model: str = "oa", **options: Any
) -> pb.EmbedResponse:
    request = pb.EmbedRequest(model=model, inputs=inputs, **options)
    response: pb.EmbedResponse = await replica.stub.Embed(request, timeout=10)
    return response


def expected(*values: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.stack([fake_vector(item_key(text=value), DIMS) for value in values])


def cached(response: pb.EmbedResponse) -> list[bool]:
    return [embedding.cached for embedding in response.embeddings]


async def test_a_repeated_input_is_served_from_the_cache(replica: Replica, fakes: Fakes) -> None:
    """The second call for the same text makes no vendor request, says so per input,
    costs no tokens, and gets exactly the same vector."""
    first = await embed(replica, texts("alpha", "beta"))
    assert cached(first) == [False, False]
    assert first.usage.total_tokens == len("alpha") + len("beta")
    assert len(fakes.openai.received) == 1

    second = await embed(replica, texts("alpha", "beta"))
    assert cached(second) == [True, True]
    assert len(fakes.openai.received) == 1
    np.testing.assert_array_equal(rows(second), rows(first))
    np.testing.assert_allclose(rows(second), expected("alpha", "beta"), atol=1e-6)
    assert second.usage.total_tokens == 0


async def test_only_the_missing_inputs_go_to_the_vendor_in_order(
    replica: Replica, fakes: Fakes
) -> None:
    """Of a call's inputs, only those not cached go to the vendor, in the call's order;
    every vector comes back at its place, and the tokens count only what was sent."""
    await embed(replica, texts("one", "three"))
    fakes.reset()
    response = await embed(replica, texts("one", "two", "three", "four"))
    assert fakes.inputs_sent() == ["two", "four"]
    assert cached(response) == [True, False, True, False]
    np.testing.assert_allclose(rows(response), expected("one", "two", "three", "four"), atol=1e-6)
    # Tokens only for what the vendor embedded for this call.
    assert response.usage.total_tokens == len("two") + len("four")


async def test_the_options_that_change_a_vector_are_part_of_the_key(
    replica: Replica, fakes: Fakes
) -> None:
    """Size, normalisation and output type each make a different entry; an unset
    size is the same entry as the model's default size asked for explicitly."""
    await embed(replica, texts("keyed"))
    variants: list[dict[str, Any]] = [
        {"dimensions": 32},
        {"normalize": False},
        {"output_type": pb.OUTPUT_TYPE_INT8},
    ]
    for options in variants:
        fakes.reset()
        response = await embed(replica, texts("keyed"), **options)
        assert cached(response) == [False], options
        assert fakes.inputs_sent() == ["keyed"], options
        again = await embed(replica, texts("keyed"), **options)
        assert cached(again) == [True], options
    fakes.reset()
    response = await embed(replica, texts("keyed"), dimensions=DIMS)
    assert cached(response) == [True]
    assert fakes.openai.received == []


async def test_images_are_keyed_by_their_bytes_and_uris_by_their_text(
    replica: Replica, fakes: Fakes
) -> None:
    """An image given as bytes is cached by those bytes, one given by URI by the URI's
    text: the same bytes or URI hit, other bytes or another URI miss."""
    other_png = PNG_1X1[:-4] + b"\x00\x00\x00\x01"  # different bytes (the fake never decodes)
    first = [
        pb.Input(image=pb.Image(data=PNG_1X1)),
        pb.Input(image=pb.Image(uri=CAT)),
    ]
    await embed(replica, first, model="clip")
    fakes.reset()
    response = await embed(
        replica,
        [
            pb.Input(image=pb.Image(data=PNG_1X1)),
            pb.Input(image=pb.Image(uri=CAT)),
            pb.Input(image=pb.Image(data=other_png)),
            pb.Input(image=pb.Image(uri=DOG)),
        ],
        model="clip",
    )
    assert cached(response) == [True, True, False, False]
    assert len(fakes.inputs_sent(fakes.relay)) == 2


async def test_no_cache_neither_reads_nor_stores(replica: Replica, fakes: Fakes) -> None:
    """no_cache sends every input to the vendor even when cached, and stores nothing of
    what comes back."""
    await embed(replica, texts("stored"))
    fakes.reset()
    response = await embed(replica, texts("stored", "unstored"), no_cache=True)
    assert cached(response) == [False, False]
    assert fakes.inputs_sent() == ["stored", "unstored"]
    fakes.reset()
    response = await embed(replica, texts("unstored"))
    assert cached(response) == [False]
    assert fakes.inputs_sent() == ["unstored"]


async def test_stream_embed_reports_cached_inputs_first(replica: Replica, fakes: Fakes) -> None:
    """StreamEmbed answers the cached inputs at once, before the ones the vendor embeds;
    only those go to the vendor."""
    await embed(replica, texts("warm"))
    fakes.reset()
    call = replica.stub.StreamEmbed(
        pb.StreamEmbedRequest(request=pb.EmbedRequest(model="oa", inputs=texts("cold", "warm"))),
        timeout=10,
    )
    messages = [message async for message in call]
    assert [(m.index, m.embedding.cached) for m in messages] == [(1, True), (0, False)]
    assert fakes.inputs_sent() == ["cold"]


async def test_identical_inputs_in_flight_are_sent_once(replica: Replica, fakes: Fakes) -> None:
    """Concurrent calls for the same text while it is in flight share one vendor input,
    and a text repeated within one call is sent once; the vendor's tokens are counted
    once."""
    fakes.openai.plan(Fault.delay(0.3))
    calls = [embed(replica, texts("popular"), no_cache=False) for _ in range(5)]
    responses = await asyncio.gather(*calls)
    assert fakes.inputs_sent() == ["popular"]
    for response in responses:
        np.testing.assert_allclose(rows(response), expected("popular"), atol=1e-6)
    assert sorted(r.usage.total_tokens for r in responses) == [0, 0, 0, 0, len("popular")]

    fakes.reset()
    response = await embed(replica, texts("twice", "other", "twice"))
    assert fakes.inputs_sent() == ["twice", "other"]
    np.testing.assert_allclose(rows(response), expected("twice", "other", "twice"), atol=1e-6)
    assert response.usage.total_tokens == len("twice") + len("other")


async def test_a_caller_leaving_does_not_cancel_an_input_others_wait_for(
    replica: Replica, fakes: Fakes
) -> None:
    """When the caller that sent an input leaves, the vendor request goes on for the
    caller that waits for the same input: it gets its vector, and the vendor sees no
    disconnect."""
    fakes.openai.plan(Fault.delay(0.4))
    first = asyncio.ensure_future(embed(replica, texts("shared")))
    await asyncio.sleep(0.1)  # the first call's input is at the vendor
    second = asyncio.ensure_future(embed(replica, texts("shared")))
    await asyncio.sleep(0.05)
    first.cancel()
    response = await second
    np.testing.assert_allclose(rows(response), expected("shared"), atol=1e-6)
    assert fakes.inputs_sent() == ["shared"]
    assert fakes.openai.disconnects == 0
    with contextlib.suppress(asyncio.CancelledError):
        await first


async def test_a_joining_caller_with_a_later_deadline_is_not_cut_short(
    replica: Replica, fakes: Fakes
) -> None:
    """A caller does not wait on a request that ends at an earlier caller's deadline:
    when the short caller gives up, the patient one still gets its vector."""
    fakes.openai.plan(Fault.delay(0.8), None)
    short = replica.stub.Embed(pb.EmbedRequest(model="oa", inputs=texts("slow")), timeout=0.4)
    await asyncio.sleep(0.1)
    patient = await embed(replica, texts("slow"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await short
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    np.testing.assert_allclose(rows(patient), expected("slow"), atol=1e-6)


async def test_a_failure_in_flight_reaches_every_caller_on_its_own_input(
    replica: Replica, fakes: Fakes
) -> None:
    """A vendor request shared by callers that fails reaches each of them, its message
    naming that caller's own input; nothing that failed is cached."""
    # A call held at the vendor first: while it is in flight, the two calls wait for
    # company and share one request.
    fakes.openai.plan(Fault.delay(0.3), Fault.status(400))
    pacer = replica.stub.Embed(pb.EmbedRequest(model="oa-wait", inputs=texts("pacer")), timeout=5)
    await eventually(lambda: len(fakes.openai.received) == 1)
    calls = [
        replica.stub.Embed(pb.EmbedRequest(model="oa-wait", inputs=texts("x", "bad")), timeout=5),
        replica.stub.Embed(pb.EmbedRequest(model="oa-wait", inputs=texts("bad")), timeout=5),
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await pacer
    assert len(fakes.openai.received) == 2
    assert sorted(fakes.openai.received[1].body["input"]) == ["bad", "x"]
    indexes: list[str] = []
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
        indexes.append(outcome.details() or "")
    # Each caller's message names its own input, not the other caller's.
    assert indexes[1].startswith("inputs[0]")
    # Nothing failed is cached.
    fakes.reset()
    await embed(replica, texts("bad"))
    assert fakes.inputs_sent() == ["bad"]


async def test_the_memory_tier_is_bounded_in_bytes_and_in_time(fakes: Fakes) -> None:
    """The memory tier keeps at most max_bytes (the least recently used go first) and
    nothing longer than ttl_s."""
    fakes.reset()
    entry = DIMS * 4 + 200  # a float32 vector and the per-entry allowance
    replica = await start_replica(fakes, {"max_bytes": 3 * entry, "ttl_s": 0.5})
    try:
        await embed(replica, texts("a", "b", "c"))
        await embed(replica, texts("a"))  # "a" is now the most recently used
        await embed(replica, texts("d"))  # evicts the least recently used: "b"
        fakes.reset()
        response = await embed(replica, texts("a", "c", "d", "b"))
        assert cached(response) == [True, True, True, False]
        await asyncio.sleep(0.6)
        fakes.reset()
        response = await embed(replica, texts("a"))
        assert cached(response) == [False]
    finally:
        await replica.close()


async def test_a_disabled_cache_sends_everything(fakes: Fakes) -> None:
    """With the cache off, every input goes to the vendor, repeats included."""
    fakes.reset()
    replica = await start_replica(fakes, {"enabled": False})
    try:
        await embed(replica, texts("again"))
        response = await embed(replica, texts("again", "again"))
        assert cached(response) == [False, False]
        assert fakes.inputs_sent() == ["again", "again", "again"]
    finally:
        await replica.close()


# -- rerank through the cache -------------------------------------------------------------


async def test_rerank_by_cosine_goes_through_the_cache(replica: Replica, fakes: Fakes) -> None:
    """A cosine rerank embeds its query and documents through the cache: scores are the
    cosines of the vendor's vectors, what was cached is not sent again and is marked
    cached, and no_cache sends everything."""
    docs = ["red", "green", "blue"]
    first = await replica.stub.Rerank(
        pb.RerankRequest(model="oa", query="colour", documents=docs), timeout=10
    )
    assert first.method == pb.RERANK_METHOD_EMBEDDING_COSINE
    assert sorted(fakes.inputs_sent()) == sorted(["colour", *docs])
    query = fake_vector(item_key(text="colour"), DIMS)
    scores = {i: float(fake_vector(item_key(text=d), DIMS) @ query) for i, d in enumerate(docs)}
    assert [r.index for r in first.results] == sorted(scores, key=lambda i: -scores[i])
    for result in first.results:
        assert result.relevance_score == pytest.approx(scores[result.index], abs=1e-5)
    assert not first.query_cached
    assert not any(result.cached for result in first.results)

    fakes.reset()
    second = await replica.stub.Rerank(
        pb.RerankRequest(model="oa", query="colour", documents=["blue", "violet", "red"]),
        timeout=10,
    )
    assert fakes.inputs_sent() == ["violet"]
    assert second.query_cached
    assert {r.index: r.cached for r in second.results} == {0: True, 1: False, 2: True}

    fakes.reset()
    await replica.stub.Rerank(
        pb.RerankRequest(model="oa", query="colour", documents=["red"], no_cache=True),
        timeout=10,
    )
    assert sorted(fakes.inputs_sent()) == ["colour", "red"]


async def test_a_text_query_ranks_images(replica: Replica, fakes: Fakes) -> None:
    """A cosine rerank of a text query against image and text+image documents orders them
    by the cosine of their vectors and returns each document input as given."""
    documents = [
        pb.Input(image=pb.Image(uri=CAT)),
        pb.Input(image=pb.Image(uri=DOG)),
        pb.Input(text_image=pb.TextImage(text="a bird", image=pb.Image(uri=CAT))),
    ]
    response = await replica.stub.Rerank(
        pb.RerankRequest(
            model="clip", query="a cat", document_inputs=documents, return_documents=True
        ),
        timeout=10,
    )
    assert response.method == pb.RERANK_METHOD_EMBEDDING_COSINE
    keys = [item_key(image=CAT), item_key(image=DOG), item_key(text="a bird", image=CAT)]
    query = fake_vector(item_key(text="a cat"), 32)
    scores = [float(fake_vector(key, 32) @ query) for key in keys]
    assert [r.index for r in response.results] == sorted(range(3), key=lambda i: -scores[i])
    for result in response.results:
        assert result.relevance_score == pytest.approx(scores[result.index], abs=1e-5)
        assert result.document_input == documents[result.index]
        assert not result.HasField("document")


async def test_multimodal_documents_are_checked_against_the_model(replica: Replica) -> None:
    """Rerank's document inputs are checked as Embed's are: a modality the model does not
    take (a text-only model; a vendor reranker, texts only) is UNSUPPORTED_MODALITY, a bad
    URI or an empty text is named at its path, and documents given both ways is
    CONFLICTING_FIELDS."""
    from conftest import rich_error

    cases: list[tuple[str, list[pb.Input], dict[str, str]]] = [
        (
            "oa",  # a text-only model
            [pb.Input(text="fine"), pb.Input(image=pb.Image(uri=CAT))],
            {"document_inputs[1].image": "UNSUPPORTED_MODALITY"},
        ),
        (
            "reranker",  # the vendor's reranker ranks texts only
            [pb.Input(image=pb.Image(uri=CAT))],
            {"document_inputs[0].image": "UNSUPPORTED_MODALITY"},
        ),
        (
            "clip",
            [pb.Input(image=pb.Image(uri="ftp://nope")), pb.Input(text=" ")],
            {
                "document_inputs[0].image.uri": "INVALID_IMAGE_URI",
                "document_inputs[1].text": "EMPTY_TEXT",
            },
        ),
    ]
    for model, documents, want in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await replica.stub.Rerank(
                pb.RerankRequest(model=model, query="q", document_inputs=documents), timeout=5
            )
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.violation_reasons == want, model
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.stub.Rerank(
            pb.RerankRequest(
                model="clip", query="q", documents=["a"], document_inputs=[pb.Input(text="b")]
            ),
            timeout=5,
        )
    assert rich_error(caught.value).violation_reasons == {"document_inputs": "CONFLICTING_FIELDS"}


# -- the shared Redis tier -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


async def test_replicas_share_vectors_through_redis(fakes: Fakes, redis_url: str) -> None:
    """Two gateways on one Redis share vectors: what one embedded (written with the TTL)
    the other reads instead of sending it to the vendor."""
    fakes.reset()
    cache = {"redis_url": redis_url, "ttl_s": 30}
    one = await start_replica(fakes, cache)
    two = await start_replica(fakes, cache)
    try:
        first = await embed(one, texts("shared-a", "shared-b"))
        assert cached(first) == [False, False]
        written = redis.Redis.from_url(redis_url)
        try:
            for _ in range(100):  # writes to Redis happen in the background
                keys = written.keys(REDIS_PREFIX + b"*")
                if len(keys) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert len(keys) == 2
            assert all(0 < written.ttl(key) <= 30 for key in keys)
        finally:
            written.close()
        fakes.reset()
        second = await embed(two, texts("shared-b", "shared-a", "own"))
        assert cached(second) == [True, True, False]
        assert fakes.inputs_sent() == ["own"]
        np.testing.assert_array_equal(rows(second)[:2], rows(first)[::-1])
    finally:
        await one.close()
        await two.close()


async def test_an_unreachable_redis_costs_nothing_but_the_cache(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    """With nothing listening at the Redis address, calls are served by the vendor and
    the memory tier; the outage is logged once, without the URL's password."""
    fakes.reset()
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    replica = await start_replica(fakes, {"redis_url": url, "redis_timeout_s": 0.2})
    try:
        for _ in range(3):
            response = await embed(replica, texts("no-redis", "other"))
            np.testing.assert_allclose(rows(response), expected("no-redis", "other"), atol=1e-6)
        assert fakes.inputs_sent() == ["no-redis", "other"]  # the memory tier still works
    finally:
        await replica.close()
    logged = capsys.readouterr().out
    assert logged.count("cache_redis_unavailable") == 1
    assert "hunter2" not in logged
