"""The embedded default model gives real, sensible vectors, honours `dimensions` and
`normalize`, batches concurrent work, and leaves the server responsive. Every test here
loads it: they are marked `local`."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
import structlog
from conftest import LOCAL, LocalServed
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedgate.server.domain import EmbedOptions, Image, ImageInput, Input, TextInput
from embedgate.server.providers import local as local_module
from embedgate.server.providers.local import (
    PRECISION_COSINE,
    LocalProvider,
    LocalSettings,
    native_bfloat16,
    plan_passes,
)
from embedgate.v1 import embedding_service_pb2 as pb

pytestmark = pytest.mark.local


def assert_same_vectors(local: LocalProvider, got: Any, expected: Any) -> None:
    """The vectors a text gets in one batch and in another: equal to float32's rounding
    in float32; in bfloat16 the products' rounding moves with the batch's shape, within
    a cosine of 0.99999."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if local.precision == "float32":
        np.testing.assert_allclose(got, expected, atol=1e-5)
        return
    cosine = (got * expected).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() >= 0.99999


async def embed_texts(local_served: LocalServed, texts: list[str], **options: object) -> np.ndarray:
    request = pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text=t) for t in texts], **options)  # type: ignore[arg-type]
    response = await local_served.stub.Embed(request, timeout=60)
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


async def test_default_model_gives_384_dimension_unit_vectors(local_served: LocalServed) -> None:
    """all-minilm-l6-v2 answers with 384 values per input, unit length by default."""
    vectors = await embed_texts(local_served, ["two apples", "a pair of apples"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_similar_texts_are_nearer_than_unrelated_ones(local_served: LocalServed) -> None:
    """'two apples' is nearer 'a pair of apples' than a stock market report."""
    apples, pair, stocks = await embed_texts(
        local_served, ["two apples", "a pair of apples", "quarterly stock market report"]
    )
    near = float(apples @ pair)
    far = float(apples @ stocks)
    assert near > 0.6
    assert near > far + 0.3


async def test_response_carries_model_usage_and_request_id(local_served: LocalServed) -> None:
    """The response names the model, counts tokens and echoes (or makes up) the request id."""
    request = pb.EmbedRequest(
        model=LOCAL, inputs=[pb.Input(text="two apples")], request_id="req-42"
    )
    call = local_served.stub.Embed(request, timeout=60)
    response = await call
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())
    assert response.model == LOCAL
    assert response.request_id == "req-42"
    # [CLS] two apples [SEP]
    assert response.usage.prompt_tokens == 4
    assert response.usage.total_tokens == 4
    anonymous = await local_served.stub.Embed(
        pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text="x")]), timeout=60
    )
    assert len(anonymous.request_id) == 32


async def test_normalize_false_returns_the_raw_pooled_vector(local_served: LocalServed) -> None:
    """normalize=false gives the model's raw mean-pooled vector, whose direction matches
    the normalised one."""
    raw = (await embed_texts(local_served, ["two apples"], normalize=False))[0]
    unit = (await embed_texts(local_served, ["two apples"], normalize=True))[0]
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 0.05
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 64, 128, 384])
async def test_dimensions_cut_then_renormalise(local_served: LocalServed, dims: int) -> None:
    """dimensions=N keeps the first N values of the raw vector, rescaled to unit length."""
    raw = (await embed_texts(local_served, ["two apples"], normalize=False))[0]
    cut = (await embed_texts(local_served, ["two apples"], dimensions=dims))[0]
    assert cut.shape == (dims,)
    expected = raw[:dims] / np.linalg.norm(raw[:dims])
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    unnormalised = (
        await embed_texts(local_served, ["two apples"], dimensions=dims, normalize=False)
    )[0]
    np.testing.assert_allclose(unnormalised, raw[:dims], atol=1e-5)


async def test_concurrent_calls_are_batched_and_get_their_own_vectors(
    local_served: LocalServed,
) -> None:
    """Concurrent calls each get exactly the vectors they would get alone."""
    texts = [f"sentence number {i} about fruit" for i in range(24)]
    alone = await embed_texts(local_served, texts)
    local_served.local.recent_batch_sizes.clear()
    together = await asyncio.gather(*(embed_texts(local_served, [t]) for t in texts))
    assert_same_vectors(local_served.local, [vectors[0] for vectors in together], alone)
    # 24 one-text calls at once were merged: fewer forward passes than calls.
    passes = list(local_served.local.recent_batch_sizes)
    assert sum(passes) == 24
    assert len(passes) < 24
    assert max(passes) > 1


async def test_health_answers_while_the_model_computes(local_served: LocalServed) -> None:
    """The model runs off the event loop: health checks answer fast during a heavy batch."""
    health = health_pb2_grpc.HealthStub(local_served.channel)
    heavy = [pb.Input(text=("word " * 200) + str(i)) for i in range(512)]
    work = asyncio.ensure_future(
        local_served.stub.Embed(pb.EmbedRequest(model=LOCAL, inputs=heavy), timeout=120)
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


async def test_rerank_orders_documents_by_cosine_similarity(local_served: LocalServed) -> None:
    """Rerank puts the relevant document first, honours top_n and return_documents."""
    documents = ["quarterly stock market report", "a pair of apples", "the weather in Oslo"]
    response = await local_served.stub.Rerank(
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
    vectors = await embed_texts(local_served, ["two apples", *documents])
    expected = vectors[1:] @ vectors[0]
    assert scores[0] == pytest.approx(float(expected[1]), abs=1e-5)
    bare = await local_served.stub.Rerank(
        pb.RerankRequest(model=LOCAL, query="two apples", documents=documents), timeout=60
    )
    assert len(bare.results) == 3
    assert not any(r.HasField("document") for r in bare.results)


async def test_length_problems_name_the_position_in_the_batch(local_served: LocalServed) -> None:
    """The local model's length check reports each too-long text at its position in the
    batch it was given, whatever else the batch holds."""
    batch: list[Input] = [
        ImageInput(Image(uri="https://example.test/a.png")),
        TextInput("short"),
        TextInput("apple " * 400),
    ]
    problems = await local_served.local.check(batch, EmbedOptions())
    assert [(p.index, p.reason) for p in problems] == [(2, "INPUT_TOO_LONG")]


async def test_list_models_describes_the_local_model(local_served: LocalServed) -> None:
    """ListModels reports the local model as it is: provider local, text only, 512 inputs
    a call, 384 dimensions or any fewer, embeds and reranks, takes no instruction, at most
    8,192 characters a text."""
    response = await local_served.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    (local,) = response.models
    assert local.name == LOCAL
    assert local.provider == "local"
    assert list(local.modalities) == [pb.MODALITY_TEXT]
    assert local.max_inputs_per_call == 512
    assert local.default_dimensions == 384
    assert (local.min_dimensions, local.max_dimensions) == (1, 384)
    assert list(local.allowed_dimensions) == []
    assert (local.embeds, local.reranks, local.accepts_instruction) == (True, True, False)
    assert local.max_text_chars == 8192


def test_plan_passes_groups_texts_of_like_length() -> None:
    """A batch is split into passes of texts of similar length, each text in one pass,
    no pass over the limit; texts of one length stay together."""
    assert plan_passes([12] * 20, 32) == [list(range(20))]
    assert sorted(len(rows) for rows in plan_passes([12] * 40, 32)) == [8, 32]
    # Eight short texts and two long ones: padding the short ones to 200 tokens costs
    # more than a second pass.
    mixed = [200, 5, 5, 5, 5, 200, 5, 5, 5, 5]
    assert plan_passes(mixed, 32) == [[1, 2, 3, 4, 6, 7, 8, 9], [0, 5]]
    # Close lengths are not worth a pass of their own.
    assert plan_passes([10, 11, 12, 13], 32) == [[0, 1, 2, 3]]
    assert plan_passes([], 32) == []
    assert plan_passes([7], 1) == [[0]]
    lengths = [(i * 37) % 101 + 3 for i in range(300)]
    passes = plan_passes(lengths, 32)
    assert sorted(row for rows in passes for row in rows) == list(range(300))
    assert max(len(rows) for rows in passes) <= 32
    # Runs of neighbours in length: no pass reaches into another's range.
    ranges = sorted(
        (min(lengths[r] for r in rows), max(lengths[r] for r in rows)) for rows in passes
    )
    assert all(high <= low for (_, high), (low, _) in pairwise(ranges))


class _Recording:
    """Stands in for the model: records each pass's (texts, padded length)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.passes: list[tuple[int, int]] = []

    def __call__(self, features: dict[str, Any]) -> Any:
        self.passes.append(tuple(features["attention_mask"].shape))
        return self.model(features)


async def _alone_and_together(local: LocalProvider, texts: list[str]) -> tuple[Any, Any]:
    alone = [(await local.embed([TextInput(t)], EmbedOptions())).vectors[0] for t in texts]
    together = await local.embed([TextInput(t) for t in texts], EmbedOptions())
    return np.array(alone), together


@pytest.mark.parametrize("right_padded", [True, False])
async def test_a_batch_of_mixed_lengths_runs_in_passes_with_the_same_vectors(
    local_served: LocalServed, right_padded: bool
) -> None:
    """Short and long texts in one batch run in separate passes, each padded only to its
    own longest text, at most max_batch texts a pass; every text gets the vector and the
    token count it gets alone. Features that cannot be cut down are tokenized again."""
    local = local_served.local
    texts = [f"fruit {i}" for i in range(30)] + [("word " * 150) + str(i) for i in range(6)]
    recording = _Recording(local._model)
    local._model = recording
    local._right_padded = right_padded
    try:
        alone, together = await _alone_and_together(local, texts)
    finally:
        local._model = recording.model
        local._right_padded = True
    assert_same_vectors(local, together.vectors, alone)
    assert together.tokens == (4,) * 30 + (153,) * 6
    batch_passes = recording.passes[len(texts) :]
    assert sorted(batch_passes) == [(6, 153), (30, 4)]


async def test_a_crowd_coming_back_one_by_one_is_batched_together(
    local_served: LocalServed,
) -> None:
    """16 callers, each sending its next text as soon as it has the last one's vector,
    come back one by one (here a tenth of a millisecond apart): the model holds the next
    batch for them instead of running the first alone while the others queue behind it
    (batches of 1 and 15, taking turns)."""
    local = local_served.local
    texts = [f"caller {n} asks about apples, round {r}" for r in range(6) for n in range(16)]

    async def caller(n: int) -> None:
        for r in range(6):
            await asyncio.sleep(n / 10_000)
            await local.embed([TextInput(texts[r * 16 + n])], EmbedOptions())

    local.recent_batch_sizes.clear()
    await asyncio.gather(*(caller(n) for n in range(16)))
    sizes = list(local.recent_batch_sizes)
    assert sum(sizes) == 96
    # The first batch forms as the callers start; after it the crowd stays together:
    # 96 texts in about 7 batches, where taking turns of 1 and 15 would make 12.
    assert len(sizes) <= 8, sizes


async def test_a_lone_caller_is_not_held(local_served: LocalServed) -> None:
    """One caller calling again and again runs one batch per call, each as soon as it
    comes: the batcher never holds a batch for company that is not there."""
    local = local_served.local
    # A call right after a crowd's batch may wait for the crowd; after it, one is alone.
    await local.embed([TextInput("after whoever came before")], EmbedOptions())
    holds: list[int] = []
    gather = local._gather

    async def recording(callers: int, until: float) -> None:
        holds.append(callers)
        await gather(callers, until)

    local._gather = recording  # type: ignore[method-assign]
    try:
        local.recent_batch_sizes.clear()
        for n in range(5):
            await local.embed([TextInput(f"alone, call {n}")], EmbedOptions())
        assert list(local.recent_batch_sizes) == [1] * 5
        assert holds == []
        # Two callers taking turns are each other's company: the batch waits for both.
        await asyncio.gather(
            *(local.embed([TextInput(f"pair {n}")], EmbedOptions()) for n in (1, 2))
        )
        await local.embed([TextInput("one of the pair, again")], EmbedOptions())
        assert holds == [2]
    finally:
        del local._gather


def test_short_ascii_texts_surely_fit_the_window(local_served: LocalServed) -> None:
    """The length check skips counting tokens only where the count cannot exceed the
    window: ASCII texts no longer than the window less the special tokens, with this
    WordPiece tokenizer. The worst such texts (a token a character) still fit."""
    local = local_served.local
    fits = local._surely_fits
    assert fits == 256 - 2
    worst = ["!" * fits, "a " * (fits // 2), "".join(chr(33 + n % 94) for n in range(fits))]
    assert max(local._count_tokens(worst)) <= 256


async def test_the_length_check_counts_only_texts_that_might_not_fit(
    local_served: LocalServed,
) -> None:
    """Short ASCII texts are not tokenized to be checked; a long one, or a short one in
    another script (where one character may be several tokens), is."""
    local = local_served.local
    counted: list[list[str]] = []
    count_tokens = local._count_tokens

    def recording(texts: list[str]) -> list[int]:
        counted.append(texts)
        return count_tokens(texts)

    local._count_tokens = recording  # type: ignore[method-assign]
    try:
        assert await local.check([TextInput("short"), TextInput("x" * 254)], EmbedOptions()) == []
        assert counted == []
        problems = await local.check(
            [TextInput("short"), TextInput("apple " * 60), TextInput("東" * 300)], EmbedOptions()
        )
    finally:
        del local._count_tokens
    assert counted == [["apple " * 60, "東" * 300]]
    assert [(p.index, p.reason) for p in problems] == [(2, "INPUT_TOO_LONG")]


def _probe_vectors(local: LocalProvider) -> Any:
    return local._encode(list(local_module.PRECISION_PROBE))[0]


def test_bfloat16_products_keep_the_vectors_of_float32() -> None:
    """precision: bfloat16 gives every probe text (and others) the vector float32 gives,
    within PRECISION_COSINE; the two are told apart where a vector's source counts (the
    cache). auto takes bfloat16 exactly where the CPU multiplies it natively."""
    exact = LocalProvider(LocalSettings(name="m", precision="float32"))
    near = LocalProvider(LocalSettings(name="m", precision="bfloat16"))
    auto = LocalProvider(LocalSettings(name="m"))
    for local in (exact, near, auto):
        local._load()
    assert (exact.precision, near.precision) == ("float32", "bfloat16")
    assert auto.precision == ("bfloat16" if native_bfloat16() else "float32")
    assert exact.info.source != near.info.source
    texts = [*local_module.PRECISION_PROBE, "apples and pears", "word " * 300]
    a, b = exact._encode(texts)[0], near._encode(texts)[0]
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= PRECISION_COSINE
    # bfloat16 did change the products (it is not float32 under another name).
    assert np.abs(a - b).max() > 1e-6


def test_auto_stays_float32_when_bfloat16_drifts(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the probe's vectors drift further than allowed, auto keeps float32, and every
    layer is as it was: the vectors are float32's exactly."""
    if not native_bfloat16():
        pytest.skip("this CPU does not multiply bfloat16 natively: auto never tries it")
    exact = LocalProvider(LocalSettings(name="m", precision="float32"))
    exact._load()
    monkeypatch.setattr(local_module, "PRECISION_COSINE", 1.5)  # nothing is that close
    auto = LocalProvider(LocalSettings(name="m"))
    auto._load()
    assert auto.precision == "float32"
    np.testing.assert_array_equal(_probe_vectors(auto), _probe_vectors(exact))


def test_an_explicit_bfloat16_runs_even_when_it_drifts(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision: bfloat16 is the operator's choice: kept even where the probe drifts
    further than auto allows, with a warning that says by how much."""
    monkeypatch.setattr(local_module, "PRECISION_COSINE", 1.5)  # nothing is that close
    forced = LocalProvider(LocalSettings(name="m", precision="bfloat16"))
    with structlog.testing.capture_logs() as logs:
        forced._load()
    assert forced.precision == "bfloat16"
    (warning,) = [entry for entry in logs if entry["event"] == "local_model_bfloat16_drifts"]
    assert warning["log_level"] == "warning"
    assert 0.999 < warning["cosine_to_float32"] < 1.0
