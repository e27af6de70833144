"""The OpenAI embeddings API on the HTTP port, called with the official `openai` SDK:
the same vectors as gRPC's Embed, the caller's models, and errors as the SDK's own
exceptions with the HTTP status of the gRPC code."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
import structlog
from fakes import Fault, make_fake
from gateways import HttpServed, key_file, openai_model, samples, serving_http, value
from prometheus_client import generate_latest

from embedgate.v1 import embedding_service_pb2 as pb

TOKEN = "openai-door-token-canary-41c2"  # noqa: S105
LIMITED = "openai-door-limited-canary-77aa"


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[HttpServed]:
    keys = key_file(tmp_path)
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "limited").write_text(LIMITED)
    auth = {
        "tokens": [
            {"name": "app", "token_file": str(tmp_path / "token")},
            {"name": "small", "token_file": str(tmp_path / "limited"), "models": ["m"]},
        ]
    }
    async with make_fake("openai", api_key="vendor-key-for-tests") as fake:
        models = [
            openai_model(fake, keys),
            openai_model(fake, keys, name="other", dimensions=8),
        ]
        async with serving_http(models, fake, "/v1", auth=auth) as served:
            yield served


def client(served: HttpServed, token: str = TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=served.base_url, max_retries=0)


async def grpc_vectors(served: HttpServed, texts: list[str], **options: object) -> np.ndarray:
    request = pb.EmbedRequest(model="m", inputs=[pb.Input(text=t) for t in texts], **options)  # type: ignore[arg-type]
    response = await served.stub.Embed(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


async def test_embeddings_match_grpc_in_base64_and_in_float(served: HttpServed) -> None:
    """The SDK's default (base64) and float replies carry exactly the float32 vectors
    gRPC's Embed gives for the same texts, in order, with usage."""
    texts = ["apples", "pears", "a third text"]
    expected = await grpc_vectors(served, texts)
    async with client(served) as sdk:
        default = await sdk.embeddings.create(model="m", input=texts)
        floats = await sdk.embeddings.create(model="m", input=texts, encoding_format="float")
        one = await sdk.embeddings.create(model="m", input="apples", encoding_format="float")
    for reply in (default, floats):
        assert reply.model == "m"
        assert [d.index for d in reply.data] == [0, 1, 2]
        got = np.array([d.embedding for d in reply.data], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
        assert reply.usage.prompt_tokens > 0
    np.testing.assert_array_equal(np.array(one.data[0].embedding, dtype=np.float32), expected[0])


async def test_the_sync_client_and_dimensions(served: HttpServed) -> None:
    """The synchronous SDK works the same (here from a thread, the server being on this
    loop); `dimensions` is the contract's."""
    expected = await grpc_vectors(served, ["apples"], dimensions=16)

    def call() -> list[float]:
        with openai.OpenAI(api_key=TOKEN, base_url=served.base_url, max_retries=0) as sdk:
            reply = sdk.embeddings.create(model="m", input=["apples"], dimensions=16)
        return list(reply.data[0].embedding)

    got = np.array(await asyncio.to_thread(call), dtype=np.float32)
    assert got.shape == (16,)
    np.testing.assert_array_equal(got, expected[0])


async def test_models_lists_what_the_token_may_use(served: HttpServed) -> None:
    """`models.list` shows the models, with embedgate's description of each; a token
    limited to some models sees only those."""
    async with client(served) as sdk:
        every = [model.id async for model in sdk.models.list()]
        listing = await sdk.models.list()
    async with client(served, LIMITED) as sdk:
        limited = [model.id async for model in sdk.models.list()]
    assert every == ["m", "other"]
    assert limited == ["m"]
    described = listing.data[1].model_extra["embedgate"]  # type: ignore[index]
    assert described["name"] == "other"
    assert described["default_dimensions"] == 8


async def test_errors_are_the_sdks_own_with_the_grpc_codes_status(served: HttpServed) -> None:
    """Each failure is the SDK's exception for its status, with embedgate's reason as
    the code and the field as the caller named it as the param."""
    async with client(served) as sdk:
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.embeddings.create(model="nope", input="a")
        with pytest.raises(openai.BadRequestError) as empty:
            await sdk.embeddings.create(model="m", input=["fine", ""])
        with pytest.raises(openai.BadRequestError) as tokens:
            await sdk.embeddings.create(model="m", input=[[101, 2023]])
        with pytest.raises(openai.BadRequestError) as encoding:
            await sdk.embeddings.create(model="m", input="a", encoding_format="bits")  # type: ignore[arg-type]
    async with client(served, "not-the-token") as sdk:
        with pytest.raises(openai.AuthenticationError) as unknown:
            await sdk.embeddings.create(model="m", input="a")
    async with client(served, LIMITED) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as scoped:
            await sdk.embeddings.create(model="other", input="a")
    assert missing.value.status_code == 404
    assert missing.value.code == "MODEL_NOT_FOUND"
    assert (empty.value.code, empty.value.param) == ("EMPTY_TEXT", "input[1].text")
    assert tokens.value.param == "input[0]"
    assert "texts" in tokens.value.message
    assert encoding.value.param == "encoding_format"
    assert (unknown.value.status_code, unknown.value.code) == (401, "INVALID_TOKEN")
    assert (scoped.value.status_code, scoped.value.code) == (403, "MODEL_NOT_PERMITTED")
    assert served.fake.received == []  # none of them reached the vendor


async def test_an_overloaded_vendor_is_a_429_with_retry_after(served: HttpServed) -> None:
    """A vendor that answers 429 with Retry-After, every time: the caller gets a 429
    (the SDK's RateLimitError) and a Retry-After of its own."""
    served.fake.always(Fault.status(429, retry_after="0.2"))
    async with client(served) as sdk:
        with pytest.raises(openai.RateLimitError) as limited:
            await sdk.embeddings.create(model="m", input="a")
    assert limited.value.status_code == 429
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_request_ids_and_the_access_line(served: HttpServed) -> None:
    """The caller's x-request-id comes back and reaches the vendor; the call's access
    line says which door it came through."""
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        with structlog.testing.capture_logs() as logs:
            reply = await http.post(
                "/embeddings",
                json={"model": "m", "input": "apples"},
                headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "trace-7"},
            )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "trace-7"
    assert served.fake.received[-1].headers.get("x-request-id") == "trace-7"
    (line,) = [entry for entry in logs if entry["event"] == "rpc_finished"]
    assert (line["protocol"], line["method"], line["code"]) == ("openai", "Embed", "OK")


async def test_a_body_that_is_not_json_is_a_400(served: HttpServed) -> None:
    """A body that does not parse is the caller's error, in OpenAI's shape."""
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        reply = await http.post(
            "/embeddings", content=b"{not json", headers={"authorization": f"Bearer {TOKEN}"}
        )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "body")


async def rerank(served: HttpServed, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        return await http.post("/rerank", json=body, headers={"authorization": f"Bearer {TOKEN}"})


async def test_rerank_is_the_grpc_rerank_best_first(served: HttpServed) -> None:
    """POST /v1/rerank answers what gRPC's Rerank answers (here cosine similarity on an
    embedding model): results best first, each with its index, score and document;
    top_n keeps the best; return_documents false leaves the documents out."""
    documents = ["apples", "pears", "a third text", "apples and pears"]
    expected = await served.stub.Rerank(
        pb.RerankRequest(model="m", query="apple", documents=documents, return_documents=True),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )
    reply = await rerank(served, {"model": "m", "query": "apple", "documents": documents})
    assert reply.status_code == 200
    results = reply.json()["results"]
    assert [(r["index"], r["relevance_score"]) for r in results] == [
        (r.index, r.relevance_score) for r in expected.results
    ]
    assert [r["document"] for r in results] == [
        {"text": documents[r.index]} for r in expected.results
    ]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    top = await rerank(
        served,
        {
            "model": "m",
            "query": "apple",
            "documents": documents,
            "top_n": 2,
            "return_documents": False,
        },
    )
    assert [r["index"] for r in top.json()["results"]] == [r.index for r in expected.results[:2]]
    assert all("document" not in r for r in top.json()["results"])


async def test_rerank_errors_name_the_callers_fields(served: HttpServed) -> None:
    """A document the model cannot take is blamed as `documents[i]`, as the caller sent
    it; a missing query and a bad top_n are the caller's errors too."""
    image = {"image": {"uri": "https://example.test/a.png"}}
    wrong = await rerank(served, {"model": "m", "query": "q", "documents": ["a", image]})
    no_query = await rerank(served, {"model": "m", "documents": ["a"]})
    bad_top = await rerank(served, {"model": "m", "query": "q", "documents": ["a"], "top_n": 0})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["param"].startswith("documents[1]")
    assert wrong.json()["error"]["code"] == "UNSUPPORTED_MODALITY"
    assert no_query.status_code == 400
    assert no_query.json()["error"]["param"] == "query"
    assert (bad_top.status_code, bad_top.json()["error"]["param"]) == (400, "top_n")


async def test_langchain_openai_embeddings(served: HttpServed) -> None:
    """langchain-openai's OpenAIEmbeddings, configured as users do for a server that is
    not OpenAI (its base URL, no client-side token counting): embed_documents and
    embed_query give gRPC's vectors."""
    from langchain_openai import OpenAIEmbeddings

    texts = ["apples", "pears"]
    expected = await grpc_vectors(served, texts)
    # Its own HTTP clients, closed here: LangChain leaves the ones it makes open.
    with httpx.Client() as sync_http:
        async with httpx.AsyncClient() as async_http:
            embeddings = OpenAIEmbeddings(
                model="m",
                base_url=served.base_url,
                api_key=TOKEN,  # type: ignore[arg-type]
                check_embedding_ctx_length=False,
                max_retries=0,
                http_client=sync_http,
                http_async_client=async_http,
            )
            documents = await embeddings.aembed_documents(texts)
            query = await embeddings.aembed_query("apples")
            synchronous = await asyncio.to_thread(embeddings.embed_documents, texts)
    np.testing.assert_allclose(np.array(documents), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.array(synchronous), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.array(query), expected[0], rtol=0, atol=1e-7)


async def test_calls_are_counted_under_their_protocol(served: HttpServed) -> None:
    """The RPC counters tell the doors apart: grpc, openai, rerank."""
    await grpc_vectors(served, ["apples"])
    async with client(served) as sdk:
        await sdk.embeddings.create(model="m", input="apples")
        with pytest.raises(openai.NotFoundError):
            await sdk.embeddings.create(model="nope", input="apples")
    await rerank(served, {"model": "m", "query": "q", "documents": ["a", "b"]})
    found = samples(generate_latest(served.gateway.metrics.registry).decode())
    counted = {
        (protocol, method, model, code): value(
            found,
            "embedgate_rpcs_total",
            method=method,
            model=model,
            code=code,
            protocol=protocol,
        )
        for protocol, method, model, code in [
            ("grpc", "Embed", "m", "OK"),
            ("openai", "Embed", "m", "OK"),
            ("openai", "Embed", "(unknown)", "NOT_FOUND"),
            ("rerank", "Rerank", "m", "OK"),
        ]
    }
    assert set(counted.values()) == {1.0}, counted


async def test_coheres_client_reranks_through_the_rerank_door(served: HttpServed) -> None:
    """Cohere's own SDK, pointed at the server, reranks through POST /v1/rerank and reads
    gRPC's results: the same order and scores, top_n respected."""
    import cohere

    documents = ["apples", "pears", "a third text", "apples and pears"]
    expected = await served.stub.Rerank(
        pb.RerankRequest(model="m", query="apple", documents=documents, top_n=2),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )
    async with httpx.AsyncClient() as http:
        sdk = cohere.AsyncClient(
            api_key=TOKEN, base_url=served.base_url.removesuffix("/v1"), httpx_client=http
        )
        reply = await sdk.rerank(model="m", query="apple", documents=documents, top_n=2)
    assert [(r.index, r.relevance_score) for r in reply.results] == [
        (r.index, r.relevance_score) for r in expected.results
    ]


async def post(served: HttpServed, path: str, body: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        return await http.post(path, json=body, headers={"authorization": f"Bearer {TOKEN}"})


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/embeddings", [1, 2], "body", "INVALID_REQUEST"),
        ("/embeddings", {"model": "m"}, "input", "MISSING_FIELD"),
        ("/embeddings", {"model": "m", "input": 5}, "input", "INVALID_REQUEST"),
        ("/embeddings", {"model": "m", "input": [None]}, "input[0]", "INVALID_REQUEST"),
        ("/embeddings", {"model": "m", "input": [{"nope": 1}]}, "input[0]", "INVALID_REQUEST"),
        ("/embeddings", {"model": 5, "input": "a"}, "model", "INVALID_REQUEST"),
        ("/embeddings", {"model": "m", "input": "a", "dimensions": "8"}, "dimensions", None),
        ("/embeddings", {"model": "m", "input": "a", "output_type": "bits"}, "output_type", None),
        ("/embeddings", {"model": "m", "input": [""]}, "input[0].text", "EMPTY_TEXT"),
        ("/rerank", "a string", "body", "INVALID_REQUEST"),
        ("/rerank", {"model": "m", "query": "q"}, "documents", "MISSING_FIELD"),
        ("/rerank", {"model": "m", "query": "q", "documents": "a"}, "documents", None),
        ("/rerank", {"model": "m", "query": "q", "documents": ["a", 5]}, "documents[1]", None),
        ("/rerank", {"model": "m", "query": "q", "documents": [{"x": 1}]}, "documents[0]", None),
        ("/rerank", {"model": 5, "query": "q", "documents": ["a"]}, "model", None),
        ("/rerank", {"model": "m", "query": 5, "documents": ["a"]}, "query", None),
        (
            "/rerank",
            {"model": "m", "query": "q", "documents": ["a"], "return_documents": "yes"},
            "return_documents",
            None,
        ),
    ],
)
async def test_bad_bodies_name_the_field(
    served: HttpServed, path: str, body: object, param: str, code: str | None
) -> None:
    """Each malformed body is a 400 blaming the field as the caller named it (and never
    reaches the vendor)."""
    reply = await post(served, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert served.fake.received == []


async def test_compact_output_types_and_input_objects(served: HttpServed) -> None:
    """output_type gives the contract's compact vectors (numbers with float, the bytes
    with base64); an input object in the contract's JSON form is a text like any other;
    a rerank document given as an object comes back in that form."""
    request = pb.EmbedRequest(
        model="m", inputs=[pb.Input(text="apples")], output_type=pb.OUTPUT_TYPE_INT8
    )
    expected = await served.stub.Embed(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
    as_numbers = await post(
        served,
        "/embeddings",
        {"model": "m", "input": [{"text": "apples"}], "output_type": "int8"},
    )
    as_bytes = await post(
        served,
        "/embeddings",
        {"model": "m", "input": "apples", "output_type": "int8", "encoding_format": "base64"},
    )
    ranked = await post(
        served,
        "/rerank",
        {"model": "m", "query": "apple", "documents": ["pears", {"text": "apples"}]},
    )
    data = expected.embeddings[0].data
    assert as_numbers.json()["data"][0]["embedding"] == list(np.frombuffer(data, dtype="i1"))
    assert base64.b64decode(as_bytes.json()["data"][0]["embedding"]) == data
    documents = {r["index"]: r["document"] for r in ranked.json()["results"]}
    assert documents == {0: {"text": "pears"}, 1: {"text": "apples"}}
