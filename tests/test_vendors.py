"""Every vendor dialect end to end: a real gateway configured the way the README shows,
real gRPC calls, and each vendor played by a loopback HTTP server that enforces its
document (tests/fakes/). What the vendor received and what the caller got are
both checked."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
import structlog
from conftest import PNG_1X1, rich_error, unpack_status
from fakes import FakeVendor, Fault, fake_vector, item_key, rerank_score
from fakes.aggregator import AggregatorFake
from vendor_world import (
    CANARY,
    DIALECT_MODELS,
    IMAGE_URL,
    MODEL_VENDOR,
    VendorWorld,
    embed,
    embed_fails,
    eventually,
    expected,
    retry_delay,
    rows,
    text_keys,
    texts,
)

from embedgate.v1 import embedding_service_pb2 as pb

# -- each dialect, served --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "count", "batches"),
    [
        ("rzen", 3, [1, 1, 1]),
        ("ctyun", 9, [4, 4, 1]),
        ("scnet", 12, [5, 5, 2]),
        ("qianfan-v1", 17, [16, 1]),
        ("qianfan-tao", 2, [1, 1]),
        ("agg", 10, [8, 2]),
        ("openai", 9, [8, 1]),
    ],
)
async def test_a_batch_is_split_to_the_vendor_limit_and_reassembled(
    world: VendorWorld, model: str, count: int, batches: list[int]
) -> None:
    """A batch larger than the vendor takes per request is split into requests of at
    most that many, and every caller input gets its own vector, in the caller's order."""
    values = [f"{model} text number {i}" for i in range(count)]
    fake = world.fake_of(model)
    response = await embed(world, model, texts(*values))
    dims = response.embeddings[0].values.__len__()
    np.testing.assert_allclose(rows(response), expected(text_keys(values), dims), atol=1e-6)
    assert sorted(_batch_sizes(fake), reverse=True) == sorted(batches, reverse=True)
    assert response.model == model


def _batch_sizes(fake: FakeVendor) -> list[int]:
    sizes = []
    for received in fake.received:
        body = received.body
        if "texts" in body or "images" in body or "video" in body:
            sizes.append(1)
        else:
            inputs = body["input"]
            sizes.append(len(inputs) if isinstance(inputs, list) else 1)
    return sizes


@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_every_request_carries_the_key_and_json_headers(
    world: VendorWorld, model: str
) -> None:
    """Each vendor request has the bearer key, JSON content type and the caller's request
    id; RzenEmbed's required accept header is set."""
    await embed(world, model, texts("headers please"), request_id="req-42")
    (received,) = world.fake_of(model).received
    assert received.headers["authorization"] == f"Bearer {CANARY}"
    assert received.headers["content-type"].startswith("application/json")
    assert received.headers["accept"] == "application/json"
    assert received.headers["x-request-id"] == "req-42"


@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_stream_embed_reports_every_input(world: VendorWorld, model: str) -> None:
    """StreamEmbed gives each input its own vector, across split vendor requests."""
    values = [f"stream {model} {i}" for i in range(7)]
    request = pb.StreamEmbedRequest(request=pb.EmbedRequest(model=model, inputs=texts(*values)))
    got: dict[int, list[float]] = {}
    async for message in world.stub.StreamEmbed(request, timeout=10):
        assert message.WhichOneof("result") == "embedding"
        got[message.index] = list(message.embedding.values)
    assert sorted(got) == list(range(7))
    dims = len(got[0])
    vectors = np.array([got[i] for i in range(7)], dtype=np.float32)
    np.testing.assert_allclose(vectors, expected(text_keys(values), dims), atol=1e-6)


@pytest.mark.parametrize("model", ["ctyun", "scnet", "qianfan-v1", "agg", "openai"])
async def test_shuffled_indices_are_put_back_in_order(world: VendorWorld, model: str) -> None:
    """A vendor may list data[] in any order: the index, not the position, decides."""
    fake = world.fake_of(model)
    fake.always(Fault.shuffled())
    values = [f"shuffle {i}" for i in range(5)]
    response = await embed(world, model, texts(*values))
    dims = len(response.embeddings[0].values)
    np.testing.assert_allclose(rows(response), expected(text_keys(values), dims), atol=1e-6)


# -- RzenEmbed ---------------------------------------------------------------------------


async def test_rzenembed_sends_each_modality_as_documented(world: VendorWorld) -> None:
    """Text, image bytes (as base64), an image URI (passed through), a video's frames and
    a text+image pair each become one request with the right fields, and each vector is
    the one the vendor gave for that content."""
    png64 = base64.b64encode(PNG_1X1).decode()
    inputs = [
        pb.Input(text="two apples"),
        pb.Input(image=pb.Image(data=PNG_1X1)),
        pb.Input(image=pb.Image(uri=IMAGE_URL)),
        pb.Input(video=pb.Video(frames=[pb.Image(uri=IMAGE_URL), pb.Image(data=PNG_1X1)])),
        pb.Input(text_image=pb.TextImage(text="a cat", image=pb.Image(uri=IMAGE_URL))),
    ]
    keys = [
        item_key(text="two apples"),
        item_key(image=png64),
        item_key(image=IMAGE_URL),
        item_key(video=[IMAGE_URL, png64]),
        item_key(text="a cat", image=IMAGE_URL),
    ]
    response = await embed(
        world, "rzen", inputs, instruction="Find me an everyday image:", request_id="rid"
    )
    np.testing.assert_allclose(rows(response), expected(keys, 2048), atol=1e-6)
    bodies = sorted(
        (r.body for r in world.fakes["rzenembed"].received), key=lambda b: b["request_id"]
    )
    assert [b["request_id"] for b in bodies] == [f"rid-{i}" for i in range(5)]
    assert all(b["instruction"] == "Find me an everyday image:" for b in bodies)
    assert all(b["model"] == "RzenEmbed" and b["input"] == [] for b in bodies)
    assert bodies[3]["video"] == [IMAGE_URL, png64]
    assert (bodies[4]["texts"], bodies[4]["images"]) == (["a cat"], [IMAGE_URL])


async def test_rzenembed_sizes_are_sent_or_refused(world: VendorWorld) -> None:
    """A documented size is asked of the vendor; another is refused before any call on a
    plain model, and cut from the next larger size on a Matryoshka one."""
    response = await embed(world, "rzen", texts("sized"), dimensions=512)
    assert len(response.embeddings[0].values) == 512
    assert world.fakes["rzenembed"].received[-1].body["dimensions"] == 512
    error = await embed_fails(world, "rzen", texts("sized"), dimensions=300)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"dimensions": "UNSUPPORTED_DIMENSIONS"}
    assert "256, 512, 768, 1024, 1536, 2048" in error.violations["dimensions"]
    assert len(world.fakes["rzenembed"].received) == 1
    cut = await embed(world, "rzen-mrl", texts("sized"), dimensions=300)
    body = world.fakes["rzenembed"].received[-1].body
    assert body["dimensions"] == 512
    assert body["instruction"] == "Represent this for retrieval:"
    prefix = fake_vector(item_key(text="sized"), 512)[:300]
    np.testing.assert_allclose(
        np.array(cut.embeddings[0].values), prefix / np.linalg.norm(prefix), atol=1e-6
    )
    default = await embed(world, "rzen-mrl", texts("sized"))
    assert len(default.embeddings[0].values) == 1024


async def test_rzenembed_frame_limits_are_checked_before_sending(world: VendorWorld) -> None:
    """A video of 1 or 65 frames is refused naming the input's frames; no request is
    sent for any input of the call."""
    frame = pb.Image(uri=IMAGE_URL)
    error = await embed_fails(
        world,
        "rzen",
        [
            pb.Input(text="fine"),
            pb.Input(video=pb.Video(frames=[frame])),
            pb.Input(video=pb.Video(frames=[frame] * 65)),
        ],
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {
        "inputs[1].video.frames": "FRAME_COUNT_OUT_OF_RANGE",
        "inputs[2].video.frames": "FRAME_COUNT_OUT_OF_RANGE",
    }
    assert "2 to 64" in error.violations["inputs[2].video.frames"]
    assert world.fakes["rzenembed"].received == []


# -- modalities and sizes on the text vendors ------------------------------------------


@pytest.mark.parametrize("model", ["ctyun", "scnet", "qianfan-v1", "openai"])
async def test_text_only_models_refuse_images_before_any_call(
    world: VendorWorld, model: str
) -> None:
    """An image for a text-only model is INVALID_ARGUMENT naming the input and the
    models that would take it; the vendor is not called."""
    error = await embed_fails(
        world, model, [pb.Input(text="ok"), pb.Input(image=pb.Image(uri=IMAGE_URL))]
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"inputs[1].image": "UNSUPPORTED_MODALITY"}
    assert "rzen" in error.violations["inputs[1].image"]
    assert world.fake_of(model).received == []


async def test_scnet_size_is_fixed_unless_matryoshka(world: VendorWorld) -> None:
    """SCNet's size cannot change: another is refused on a plain model, and cut and
    renormalised locally on one configured matryoshka: true; no size is ever sent."""
    error = await embed_fails(world, "scnet", texts("x"), dimensions=1024)
    assert error.violation_reasons == {"dimensions": "UNSUPPORTED_DIMENSIONS"}
    assert "4096" in error.violations["dimensions"]
    response = await embed(world, "scnet-mrl", texts("x"), dimensions=1024)
    prefix = fake_vector(item_key(text="x"), 4096)[:1024]
    np.testing.assert_allclose(
        np.array(response.embeddings[0].values), prefix / np.linalg.norm(prefix), atol=1e-6
    )
    (received,) = world.fakes["scnet"].received
    assert not {"dimension", "dimensions"} & received.body.keys()


async def test_openai_takes_dimensions_natively(world: VendorWorld) -> None:
    """text-embedding-3 models are asked for the size; vectors arrive as base64 and are
    decoded."""
    response = await embed(world, "openai", texts("small"), dimensions=256, user="u-7")
    (received,) = world.fakes["openai"].received
    assert received.body["dimensions"] == 256
    assert received.body["encoding_format"] == "base64"
    assert received.body["user"] == "u-7"
    np.testing.assert_allclose(
        np.array(response.embeddings[0].values),
        fake_vector(item_key(text="small"), 256),
        atol=1e-6,
    )


async def test_qianfan_limits_are_checked_before_sending(world: VendorWorld) -> None:
    """embedding-v1 takes 1000 characters per text: a longer one is refused naming it,
    and nothing is sent."""
    error = await embed_fails(world, "qianfan-v1", texts("short", "x" * 1001))
    assert error.violation_reasons == {"inputs[1].text": "INPUT_TOO_LONG"}
    assert "at most 1000" in error.violations["inputs[1].text"]
    assert world.fakes["qianfan"].received == []


async def test_qianfan_multimodal_model_fuses_text_and_image(world: VendorWorld) -> None:
    """gme-qwen2-vl-2b-instruct gets one {text, image} object per request."""
    png64 = base64.b64encode(PNG_1X1).decode()
    inputs = [
        pb.Input(text_image=pb.TextImage(text="a cat", image=pb.Image(data=PNG_1X1))),
        pb.Input(image=pb.Image(uri=IMAGE_URL)),
    ]
    response = await embed(world, "qianfan-gme", inputs)
    keys = [item_key(text="a cat", image=png64), item_key(image=IMAGE_URL)]
    np.testing.assert_allclose(rows(response), expected(keys, 1536), atol=1e-6)
    assert sorted(len(r.body["input"]) for r in world.fakes["qianfan"].received) == [1, 1]


async def test_aggregator_forwards_normalized(world: VendorWorld) -> None:
    """normalize=false reaches the relay as normalized=false and its vectors come back
    as it sent them; by default the relay is asked for unit vectors; an image and a
    text+image pair are objects, the pair fused into one vector."""
    raw = await embed(world, "agg", texts("plain"), normalize=False)
    assert world.fakes["aggregator"].received[-1].body["normalized"] is False
    np.testing.assert_allclose(
        np.array(raw.embeddings[0].values),
        fake_vector(item_key(text="plain"), 1024) * 2.5,
        atol=1e-5,
    )
    inputs = [
        pb.Input(image=pb.Image(uri=IMAGE_URL)),
        pb.Input(text_image=pb.TextImage(text="a cat", image=pb.Image(uri=IMAGE_URL))),
    ]
    fused = await embed(world, "agg", inputs)
    body = world.fakes["aggregator"].received[-1].body
    assert body["normalized"] is True
    assert body["input"] == [{"image": IMAGE_URL}, {"text": "a cat", "image": IMAGE_URL}]
    keys = [item_key(image=IMAGE_URL), item_key(text="a cat", image=IMAGE_URL)]
    np.testing.assert_allclose(rows(fused), expected(keys, 1024), atol=1e-6)


async def test_list_models_shows_each_vendor_model(world: VendorWorld) -> None:
    """ListModels reports each vendor model's provider, modalities and sizes."""
    models = {m.name: m for m in (await world.stub.ListModels(pb.ListModelsRequest())).models}
    assert models["rzen"].provider == "rzenembed"
    assert list(models["rzen"].allowed_dimensions) == [256, 512, 768, 1024, 1536, 2048]
    assert set(models["rzen"].modalities) == {
        pb.MODALITY_TEXT,
        pb.MODALITY_IMAGE,
        pb.MODALITY_VIDEO,
        pb.MODALITY_TEXT_IMAGE,
    }
    assert models["rzen"].accepts_instruction
    assert list(models["scnet"].modalities) == [pb.MODALITY_TEXT]
    assert (models["scnet"].min_dimensions, models["scnet"].max_dimensions) == (4096, 4096)
    assert (models["scnet-mrl"].min_dimensions, models["scnet-mrl"].max_dimensions) == (1, 4096)
    assert models["agg-rerank"].reranks
    assert not models["agg-rerank"].embeds
    assert models["qianfan-v1"].default_dimensions == 384


# -- rerank ------------------------------------------------------------------------------

DOCUMENTS = [f"document about topic {i}" for i in range(10)]


def vendor_order(query: str, documents: Sequence[str]) -> list[int]:
    scores = [rerank_score(query, doc) for doc in documents]
    return sorted(range(len(documents)), key=lambda i: (-scores[i], i))


async def test_rerank_through_the_vendor_split_and_merged(world: VendorWorld) -> None:
    """Ten documents against a relay configured for four per request: three requests,
    scores merged into one ranking, top_n and return_documents applied by the gateway."""
    response = await world.stub.Rerank(
        pb.RerankRequest(
            model="agg-rerank",
            query="which topic?",
            documents=DOCUMENTS,
            top_n=3,
            return_documents=True,
        ),
        timeout=10,
    )
    order = vendor_order("which topic?", DOCUMENTS)
    assert [r.index for r in response.results] == order[:3]
    assert [r.document for r in response.results] == [DOCUMENTS[i] for i in order[:3]]
    for result in response.results:
        assert result.relevance_score == pytest.approx(
            rerank_score("which topic?", DOCUMENTS[result.index]), abs=1e-6
        )
    assert response.method == pb.RERANK_METHOD_VENDOR
    received = world.fakes["aggregator"].received
    assert sorted(len(r.body["documents"]) for r in received) == [2, 4, 4]
    assert all("top_n" not in r.body for r in received)  # split: every score is needed


async def test_rerank_top_n_is_honoured_when_the_vendor_ignores_it(world: VendorWorld) -> None:
    """A relay that sends every document despite top_n still gives the caller top_n."""
    fake = world.fakes["aggregator"]
    assert isinstance(fake, AggregatorFake)  # the fake with rerank, and ignore_top_n
    fake.ignore_top_n = True
    documents = DOCUMENTS[:4]
    response = await world.stub.Rerank(
        pb.RerankRequest(model="agg-rerank", query="q", documents=documents, top_n=2), timeout=10
    )
    assert [r.index for r in response.results] == vendor_order("q", documents)[:2]
    assert fake.received[-1].body["top_n"] == 2
    assert all(not r.HasField("document") for r in response.results)


async def test_rerank_model_does_not_embed_and_embedding_models_rank_by_cosine(
    world: VendorWorld,
) -> None:
    """Embed on a rerank-only model is refused naming models that embed; Rerank on an
    embedding model ranks by cosine similarity and says so."""
    error = await embed_fails(world, "agg-rerank", texts("x"))
    assert error.violation_reasons == {"model": "EMBED_NOT_SUPPORTED"}
    response = await world.stub.Rerank(
        pb.RerankRequest(model="openai", query="q", documents=["a", "b"]), timeout=10
    )
    assert response.method == pb.RERANK_METHOD_EMBEDDING_COSINE
    assert sorted(r.index for r in response.results) == [0, 1]


async def test_rerank_bad_replies_are_errors(world: VendorWorld) -> None:
    """A ranking with a NaN score or a missing document is an error, not a ranking."""
    fake = world.fakes["aggregator"]
    for fault in (Fault.nan(), Fault.wrong_count()):
        fake.plan(fault)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.stub.Rerank(
                pb.RerankRequest(model="agg-rerank", query="q", documents=DOCUMENTS[:3]),
                timeout=10,
            )
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason in ("VENDOR_BAD_REPLY",)


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_transient_failures_are_retried(world: VendorWorld, model: str) -> None:
    """429 with Retry-After, then 503, then success: the caller just gets its vector,
    after three vendor attempts. A vendor that keeps failing with 500 is UNAVAILABLE
    after 1 + max_retries (2) attempts, with its status in the details."""
    fake = world.fake_of(model)
    fake.plan(Fault.status(429, retry_after="0"), Fault.status(503))
    response = await embed(world, model, texts("retry me"))
    dims = len(response.embeddings[0].values)
    np.testing.assert_allclose(rows(response), expected(text_keys(["retry me"]), dims), atol=1e-6)
    assert len(fake.received) == 3
    fake.reset()
    fake.plan(Fault.status(408), Fault.status(502))
    await embed(world, model, texts("retry me"))
    assert len(fake.received) == 3
    fake.reset()
    fake.always(Fault.status(500))
    error = await embed_fails(world, model, texts("retry me"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "VENDOR_UNAVAILABLE")
    assert error.metadata["http_status"] == "500"
    assert error.metadata["attempts"] == "3"
    assert len(fake.received) == 3


async def test_retry_after_is_waited_out(world: VendorWorld) -> None:
    """A 429 with Retry-After: 1 is retried no sooner than a second later."""
    fake = world.fakes["ctyun"]
    fake.plan(Fault.status(429, retry_after="1"))
    started = time.perf_counter()
    response = await embed(world, "ctyun", texts("patience"), deadline_s=5)
    assert len(response.embeddings) == 1
    assert time.perf_counter() - started >= 0.95
    assert len(fake.received) == 2


@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_retry_after_beyond_the_deadline_fails_at_once(
    world: VendorWorld, model: str
) -> None:
    """A 429 asking to wait longer than the caller has left fails at once with
    RESOURCE_EXHAUSTED and RetryInfo saying how long; no second attempt."""
    fake = world.fake_of(model)
    fake.always(Fault.status(429, retry_after="30"))
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(world, model, texts("later"), deadline_s=5)
    assert time.perf_counter() - started < 3
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(caught.value) == 30
    error = rich_error(caught.value)
    assert error.reason == "VENDOR_RATE_LIMITED"
    assert error.metadata["vendor"] == MODEL_VENDOR[model]
    assert len(fake.received) == 1


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "VENDOR_REJECTED_REQUEST"),
        (422, grpc.StatusCode.INVALID_ARGUMENT, "VENDOR_REJECTED_REQUEST"),
        (401, grpc.StatusCode.FAILED_PRECONDITION, "VENDOR_AUTH_FAILED"),
        (403, grpc.StatusCode.FAILED_PRECONDITION, "VENDOR_AUTH_FAILED"),
        (404, grpc.StatusCode.NOT_FOUND, "VENDOR_NOT_FOUND"),
    ],
)
@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_client_errors_are_mapped_and_never_retried(
    world: VendorWorld, model: str, status: int, code: grpc.StatusCode, reason: str
) -> None:
    """4xx other than 408/429 are sent once and mapped as VENDORS.md says, with the
    vendor's name, status and message in the details; a vendor 401 is never
    UNAUTHENTICATED (that is the caller's own credentials)."""
    fake = world.fake_of(model)
    fake.always(Fault.status(status))
    error = await embed_fails(world, model, texts("once"))
    assert (error.code, error.reason) == (code, reason)
    assert error.metadata["http_status"] == str(status)
    assert error.metadata["vendor"] == MODEL_VENDOR[model]
    assert error.metadata.get("vendor_message")
    assert len(fake.received) == 1


async def test_vendor_error_code_and_request_id_reach_the_caller(world: VendorWorld) -> None:
    """The vendor's own error code and request id are in ErrorInfo."""
    fake = world.fakes["ctyun"]
    fake.always(Fault.status(400))
    error = await embed_fails(world, "ctyun", texts("x"))
    assert error.metadata["vendor_code"]
    fake.reset()
    fake = world.fakes["rzenembed"]
    fake.always(Fault.error_body())
    error = await embed_fails(world, "rzen", texts("x"), request_id="abc")
    assert (error.code, error.reason) == (grpc.StatusCode.UNKNOWN, "VENDOR_ERROR_IN_REPLY")
    assert error.metadata["vendor_code"] == "1002"
    assert error.metadata["vendor_request_id"] == "abc"


@pytest.mark.parametrize("model", DIALECT_MODELS)
@pytest.mark.parametrize(
    "fault",
    [
        Fault.malformed(),
        Fault.wrong_count(),
        Fault.duplicate_index(),
        Fault.nan(),
        Fault.wrong_dimension(),
    ],
    ids=["malformed", "wrong_count", "duplicate_index", "nan", "wrong_dimension"],
)
async def test_bad_replies_are_errors_not_data(
    world: VendorWorld, model: str, fault: Fault
) -> None:
    """A reply that is not JSON, has the wrong number of vectors, repeats an index,
    holds NaN or a vector of the wrong size is UNAVAILABLE / VENDOR_BAD_REPLY."""
    fake = world.fake_of(model)
    fake.always(fault)
    # Two inputs so that counts and indices can be wrong (RzenEmbed: one per request).
    error = await embed_fails(world, model, texts("one", "two"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "VENDOR_BAD_REPLY")
    assert error.metadata["vendor"] == MODEL_VENDOR[model]


@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_an_error_in_a_200_reply_is_an_error(world: VendorWorld, model: str) -> None:
    """An HTTP 200 whose body is the vendor's error shape is an error."""
    world.fake_of(model).always(Fault.error_body())
    error = await embed_fails(world, model, texts("x"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNKNOWN, "VENDOR_ERROR_IN_REPLY")
    assert error.metadata.get("vendor_message")


@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_connection_resets_are_retried_then_reported(world: VendorWorld, model: str) -> None:
    """A reset connection is retried; resets every time end as UNAVAILABLE."""
    fake = world.fake_of(model)
    fake.plan(Fault.reset())
    response = await embed(world, model, texts("reset"))
    assert len(response.embeddings) == 1
    assert len(fake.received) == 2
    fake.reset()
    fake.always(Fault.reset())
    error = await embed_fails(world, model, texts("reset"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "VENDOR_UNAVAILABLE")
    assert error.metadata["attempts"] == "3"


@pytest.mark.parametrize("fault", [Fault.hang(), Fault.drip(0.05)], ids=["hang", "drip"])
@pytest.mark.parametrize("model", DIALECT_MODELS)
async def test_a_stuck_vendor_call_ends_with_the_callers_deadline(
    world: VendorWorld, model: str, fault: Fault
) -> None:
    """A vendor that never answers, or sends its body a byte at a time, is abandoned
    when the caller's deadline passes: DEADLINE_EXCEEDED, and the vendor sees the
    connection go away."""
    fake = world.fake_of(model)
    fake.always(fault)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(world, model, texts("stuck"), deadline_s=0.6)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 3  # the hang itself would never end
    await eventually(lambda: fake.disconnects >= 1)
    await eventually(lambda: fake.in_flight == 0)


async def test_a_call_without_deadline_gets_the_default(world: VendorWorld) -> None:
    """With no deadline from the caller, the server's default (2 s here) bounds the
    vendor call."""
    fake = world.fakes["rzenembed"]
    fake.always(Fault.hang())
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.Embed(pb.EmbedRequest(model="rzen-patient", inputs=texts("x")))
    elapsed = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1.5 < elapsed < 4
    error = rich_error(caught.value)
    assert error.reason == "DEADLINE_EXCEEDED"
    await eventually(lambda: fake.disconnects >= 1)


async def test_a_stream_without_deadline_ends_with_the_default(world: VendorWorld) -> None:
    """A StreamEmbed with no deadline whose vendor hangs ends DEADLINE_EXCEEDED (with its
    reason) when the server's default deadline passes, not with an internal error."""
    world.fakes["rzenembed"].always(Fault.hang())
    request = pb.StreamEmbedRequest(
        request=pb.EmbedRequest(model="rzen-patient", inputs=texts("x"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in world.stub.StreamEmbed(request):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert rich_error(caught.value).reason == "DEADLINE_EXCEEDED"


async def test_a_hung_attempt_is_abandoned_and_retried(world: VendorWorld) -> None:
    """An attempt longer than the model's timeout_s is dropped and tried again."""
    fake = world.fakes["openai"]
    fake.plan(Fault.hang())
    response = await embed(world, "openai-quick", texts("again"))
    assert len(response.embeddings) == 1
    assert len(fake.received) == 2
    await eventually(lambda: fake.disconnects >= 1)


async def test_cancelling_the_rpc_cancels_the_vendor_call(world: VendorWorld) -> None:
    """A caller that goes away takes its vendor call with it."""
    fake = world.fakes["scnet"]
    fake.always(Fault.hang())
    call = world.stub.Embed(pb.EmbedRequest(model="scnet", inputs=texts("bye")), timeout=10)
    await eventually(lambda: len(fake.received) == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: fake.disconnects == 1)


async def test_a_failed_sub_request_fails_embed_and_only_its_inputs_in_a_stream(
    world: VendorWorld,
) -> None:
    """Twelve texts to SCNet are three requests. When one fails for good, Embed fails
    at once (nothing partial) and its still-running siblings are cancelled; StreamEmbed
    reports the error on that request's inputs only, and vectors for the others."""
    fake = world.fakes["scnet"]
    values = [f"part {i}" for i in range(12)]
    fake.plan(Fault.status(400))
    fake.always(Fault.hang())
    started = time.perf_counter()
    error = await embed_fails(world, "scnet", texts(*values))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert time.perf_counter() - started < 3
    # Every sibling that reached the vendor was cancelled (one still queued may never
    # have been sent).
    assert len(fake.received) >= 2
    await eventually(lambda: fake.disconnects == len(fake.received) - 1)
    fake.reset()
    fake.plan(None, Fault.status(400))
    request = pb.StreamEmbedRequest(request=pb.EmbedRequest(model="scnet", inputs=texts(*values)))
    failed: list[int] = []
    good: dict[int, list[float]] = {}
    async for message in world.stub.StreamEmbed(request, timeout=10):
        if message.HasField("error"):
            failed.append(message.index)
            status = unpack_status(message.error)
            assert status.code == grpc.StatusCode.INVALID_ARGUMENT
            assert status.reason == "VENDOR_REJECTED_REQUEST"
        else:
            good[message.index] = list(message.embedding.values)
    # The second request to arrive failed: which inputs it held depends on arrival order.
    bodies = [r.body["input"] for r in fake.received]
    failed_texts = set(bodies[1])
    assert {values[i] for i in failed} == failed_texts
    assert sorted([*failed, *good]) == list(range(12))
    for index, vector in good.items():
        np.testing.assert_allclose(
            np.array(vector), fake_vector(item_key(text=values[index]), 4096), atol=1e-6
        )


async def test_concurrency_per_model_is_bounded(world: VendorWorld) -> None:
    """A model configured max_concurrency: 2 never has more than two requests at its
    vendor, however many it needs."""
    fake = world.fakes["openai"]
    fake.always(Fault.delay(0.1))
    values = [f"bounded {i}" for i in range(40)]  # five requests of 8
    response = await embed(world, "openai", texts(*values))
    assert len(response.embeddings) == 40
    assert len(fake.received) == 5
    assert fake.max_in_flight == 2


async def test_the_key_never_reaches_logs_or_error_details(world: VendorWorld) -> None:
    """Across failures of every kind, the vendor key appears in no log event and no
    error the caller sees."""
    seen: list[str] = []
    with structlog.testing.capture_logs() as logs:
        for model in DIALECT_MODELS:
            fake = world.fake_of(model)
            for fault in (Fault.status(401), Fault.status(429, retry_after="60"), Fault.nan()):
                fake.reset()
                fake.always(fault)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await embed(world, model, texts("canary"), deadline_s=5)
                seen.append(str(caught.value.details()))
                seen.append(repr(caught.value.trailing_metadata()))
    assert logs
    assert all(CANARY not in str(event) for event in logs)
    assert all(CANARY not in text for text in seen)
