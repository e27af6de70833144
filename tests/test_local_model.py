"""The embedded default model gives real, sensible vectors, honours `dimensions` and
`normalize`, batches concurrent work, and leaves the server responsive."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from conftest import LOCAL, Served
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedgate.server.domain import EmbedOptions, Image, ImageInput, Input, TextInput
from embedgate.v1 import embedding_service_pb2 as pb


async def embed_texts(served: Served, texts: list[str], **options: object) -> np.ndarray:
    request = pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text=t) for t in texts], **options)  # type: ignore[arg-type]
    response = await served.stub.Embed(request, timeout=60)
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


async def test_default_model_gives_384_dimension_unit_vectors(served: Served) -> None:
    """all-minilm-l6-v2 answers with 384 values per input, unit length by default."""
    vectors = await embed_texts(served, ["two apples", "a pair of apples"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_similar_texts_are_nearer_than_unrelated_ones(served: Served) -> None:
    """'two apples' is nearer 'a pair of apples' than a stock market report."""
    apples, pair, stocks = await embed_texts(
        served, ["two apples", "a pair of apples", "quarterly stock market report"]
    )
    near = float(apples @ pair)
    far = float(apples @ stocks)
    assert near > 0.6
    assert near > far + 0.3


async def test_response_carries_model_usage_and_request_id(served: Served) -> None:
    """The response names the model, counts tokens and echoes (or makes up) the request id."""
    request = pb.EmbedRequest(
        model=LOCAL, inputs=[pb.Input(text="two apples")], request_id="req-42"
    )
    call = served.stub.Embed(request, timeout=60)
    response = await call
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())
    assert response.model == LOCAL
    assert response.request_id == "req-42"
    # [CLS] two apples [SEP]
    assert response.usage.prompt_tokens == 4
    assert response.usage.total_tokens == 4
    anonymous = await served.stub.Embed(
        pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text="x")]), timeout=60
    )
    assert len(anonymous.request_id) == 32


async def test_normalize_false_returns_the_raw_pooled_vector(served: Served) -> None:
    """normalize=false gives the model's raw mean-pooled vector, whose direction matches
    the normalised one."""
    raw = (await embed_texts(served, ["two apples"], normalize=False))[0]
    unit = (await embed_texts(served, ["two apples"], normalize=True))[0]
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 0.05
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 64, 128, 384])
async def test_dimensions_cut_then_renormalise(served: Served, dims: int) -> None:
    """dimensions=N keeps the first N values of the raw vector, rescaled to unit length."""
    raw = (await embed_texts(served, ["two apples"], normalize=False))[0]
    cut = (await embed_texts(served, ["two apples"], dimensions=dims))[0]
    assert cut.shape == (dims,)
    expected = raw[:dims] / np.linalg.norm(raw[:dims])
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    unnormalised = (await embed_texts(served, ["two apples"], dimensions=dims, normalize=False))[0]
    np.testing.assert_allclose(unnormalised, raw[:dims], atol=1e-5)


async def test_concurrent_calls_are_batched_and_get_their_own_vectors(served: Served) -> None:
    """Concurrent calls each get exactly the vectors they would get alone."""
    texts = [f"sentence number {i} about fruit" for i in range(24)]
    alone = await embed_texts(served, texts)
    served.local.recent_batch_sizes.clear()
    together = await asyncio.gather(*(embed_texts(served, [t]) for t in texts))
    for i, vectors in enumerate(together):
        np.testing.assert_allclose(vectors[0], alone[i], atol=1e-5)
    # 24 one-text calls at once were merged: fewer forward passes than calls.
    passes = list(served.local.recent_batch_sizes)
    assert sum(passes) == 24
    assert len(passes) < 24
    assert max(passes) > 1


async def test_health_answers_while_the_model_computes(served: Served) -> None:
    """The model runs off the event loop: health checks answer fast during a heavy batch."""
    health = health_pb2_grpc.HealthStub(served.channel)
    heavy = [pb.Input(text=("word " * 200) + str(i)) for i in range(512)]
    work = asyncio.ensure_future(
        served.stub.Embed(pb.EmbedRequest(model=LOCAL, inputs=heavy), timeout=120)
    )
    await asyncio.sleep(0.2)
    latencies: list[float] = []
    while not work.done() and len(latencies) < 50:
        started = time.perf_counter()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        latencies.append(time.perf_counter() - started)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(0.05)
    response = await work
    assert len(response.embeddings) == 512
    assert latencies, "the batch finished before any health check ran"
    # A blocked event loop would hold every check for the whole batch (seconds).
    assert max(latencies) < 1.0


async def test_rerank_orders_documents_by_cosine_similarity(served: Served) -> None:
    """Rerank puts the relevant document first, honours top_n and return_documents."""
    documents = ["quarterly stock market report", "a pair of apples", "the weather in Oslo"]
    response = await served.stub.Rerank(
        pb.RerankRequest(
            model=LOCAL, query="two apples", documents=documents, top_n=2, return_documents=True
        ),
        timeout=60,
    )
    assert response.method == pb.RERANK_METHOD_EMBEDDING_COSINE
    assert response.results[0].index == 1
    assert len(response.results) == 2
    assert response.results[0].document == "a pair of apples"
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    vectors = await embed_texts(served, ["two apples", *documents])
    expected = vectors[1:] @ vectors[0]
    assert scores[0] == pytest.approx(float(expected[1]), abs=1e-5)
    bare = await served.stub.Rerank(
        pb.RerankRequest(model=LOCAL, query="two apples", documents=documents), timeout=60
    )
    assert len(bare.results) == 3
    assert not any(r.HasField("document") for r in bare.results)


async def test_length_problems_name_the_position_in_the_batch(served: Served) -> None:
    """The local model's length check reports each too-long text at its position in the
    batch it was given, whatever else the batch holds."""
    batch: list[Input] = [
        ImageInput(Image(uri="https://example.test/a.png")),
        TextInput("short"),
        TextInput("apple " * 400),
    ]
    problems = await served.local.check(batch, EmbedOptions())
    assert [(p.index, p.reason) for p in problems] == [(2, "INPUT_TOO_LONG")]


async def test_the_request_id_comes_back_on_failures_and_streams(served: Served) -> None:
    """The caller's request id comes back in the x-request-id trailer of a call that
    fails and of a stream."""
    bad = pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text=" ")], request_id="req-bad")
    call = served.stub.Embed(bad, timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert ("x-request-id", "req-bad") in tuple(caught.value.trailing_metadata() or ())
    stream = served.stub.StreamEmbed(
        pb.StreamEmbedRequest(
            request=pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text="x")], request_id="req-s")
        ),
        timeout=60,
    )
    assert len([message async for message in stream]) == 1
    assert ("x-request-id", "req-s") in tuple(await stream.trailing_metadata())
