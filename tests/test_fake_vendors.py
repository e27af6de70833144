"""The fake vendors enforce what their documents say, so the gateway's tests against them mean
something: each test below checks one documented rule or one fault mode, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fakes
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from fakes import (
    FAKES,
    MISSING_FAKES,
    VENDORS,
    FakeVendor,
    Fault,
    fake_vector,
    item_key,
    make_fake,
    rerank_score,
)
from fakes.aggregator import AggregatorFake

KEY = "test-key"

# One valid request per dialect, and the item keys it embeds.
VALID: dict[str, tuple[dict[str, Any], list[str]]] = {
    "rzenembed": ({"model": "RzenEmbed", "input": [], "texts": ["two apples"]}, ["t:two apples"]),
    "ctyun": ({"model": "4b38a36c", "input": ["a", "b"]}, ["t:a", "t:b"]),
    "scnet": ({"model": "Qwen3-Embedding-8B", "input": ["a", "b"]}, ["t:a", "t:b"]),
    "qianfan": ({"model": "embedding-v1", "input": ["a", "b"]}, ["t:a", "t:b"]),
    "aggregator": (
        {
            "model": "m",
            "input": [{"text": "a"}, {"image": "http://x/y.png"}],
            "normalized": True,
            "embedding_type": "float",
        },
        ["t:a", "i:http://x/y.png"],
    ),
    "openai": ({"model": "text-embedding-3-small", "input": ["a", "b"]}, ["t:a", "t:b"]),
}


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as http:
        yield http


async def post(
    http: httpx.AsyncClient,
    fake: FakeVendor,
    body: dict[str, Any],
    *,
    path: str = "/embeddings",
    key: str | None = KEY,
    wait_s: float = 5,
) -> httpx.Response:
    headers = {"accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return await http.post(fake.base_url + path, json=body, headers=headers, timeout=wait_s)


def vectors(reply: httpx.Response, field: str = "embedding") -> list[npt.NDArray[np.float32]]:
    """The reply's vectors in data[] order, decoding base64 when the vendor sent it."""
    out = []
    for item in reply.json()["data"]:
        value = item[field]
        if isinstance(value, str):
            out.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:
            out.append(np.array(value, dtype=np.float32))
    return out


def error_message(dialect: str, reply: httpx.Response, status: int) -> str:
    """Check the dialect's error body shape for HTTP `status`; return its message."""
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    if dialect == "rzenembed":
        assert body["data"] == []
        assert body["response_status"] == status
        assert body["request_id"]
        return str(body["message"])
    if dialect == "qianfan":
        assert set(body) == {"id", "code", "message", "type"}
        assert body["id"].startswith("as-")
        return str(body["message"])
    error = body["error"]
    if dialect == "ctyun":
        assert set(error) == {"code", "type", "message"}
        assert error["code"] == f"{status}001"
    elif dialect == "openai":
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert set(error) == {"message", "type", "code"}
    return str(error["message"])


async def eventually_disconnected(fake: FakeVendor) -> int:
    """`disconnects` once the fake has noticed the client left (it learns asynchronously)."""
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.02)
    return fake.disconnects


# -- the shared helpers ------------------------------------------------------------------


def test_fake_vector_is_unit_float32_and_deterministic() -> None:
    """fake_vector is a unit float32 vector that depends only on the key and size."""
    vector = fake_vector("t:a", 64)
    assert vector.dtype == np.float32
    assert vector.shape == (64,)
    assert math.isclose(float(np.linalg.norm(vector)), 1.0, rel_tol=1e-5)
    assert np.array_equal(vector, fake_vector("t:a", 64))
    assert not np.array_equal(vector, fake_vector("t:b", 64))


def test_item_key_joins_parts_in_order() -> None:
    """item_key writes text, image and video parts in that order, joined by '|'."""
    assert item_key(text="a", image="http://x/y.png") == "t:a|i:http://x/y.png"
    assert item_key(video=["f1", "f2"], text="a") == "t:a|v:f1,f2"
    assert item_key(image="aGk=") == "i:aGk="


# -- the registry -------------------------------------------------------------------------


def test_every_vendor_the_gateway_registers_has_a_fake_and_no_fake_is_extra() -> None:
    """Each vendor in the gateway's registry has a fake: module fakes.<vendor>, whose `Fake`
    is a FakeVendor defined there; each fake module is of a vendor the gateway registers;
    and each has a valid request in the tests below."""
    assert MISSING_FAKES == ()
    assert list(FAKES) == list(VENDORS)
    for vendor, fake in FAKES.items():
        assert issubclass(fake, FakeVendor)
        assert fake.__module__ == f"fakes.{vendor}"
    modules = {module.name for module in pkgutil.iter_modules(fakes.__path__)}
    assert modules - {"base"} == set(VENDORS)
    assert set(VALID) == set(VENDORS)


def test_make_fake_refuses_a_vendor_without_a_fake() -> None:
    """make_fake names the vendor it has no fake of instead of building some other one."""
    with pytest.raises(ValueError, match="'nope'"):
        make_fake("nope")


# -- every dialect ------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", list(FAKES))
async def test_valid_request_gets_one_vector_per_item(
    client: httpx.AsyncClient, dialect: str
) -> None:
    """A valid request gets fake_vector(item_key) per item, data[i].index = i, JSON replies."""
    body, keys = VALID[dialect]
    async with make_fake(dialect, dims=32) as fake:
        reply = await post(client, fake, body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    data = reply.json()["data"]
    assert [item["index"] for item in data] == list(range(len(keys)))
    assert all(item["object"] == "embedding" for item in data)
    field = "embeddings" if dialect == "ctyun" else "embedding"
    for got, key in zip(vectors(reply, field), keys, strict=True):
        assert np.array_equal(got, fake_vector(key, 32))
    assert reply.json()["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("dialect", list(FAKES))
async def test_wrong_key_is_401_with_the_error_body(
    client: httpx.AsyncClient, dialect: str
) -> None:
    """A wrong Bearer key is HTTP 401 with the dialect's error body, and is still recorded."""
    async with make_fake(dialect, dims=8) as fake:
        reply = await post(client, fake, VALID[dialect][0], key="wrong")
        missing = await post(client, fake, VALID[dialect][0], key=None)
    assert reply.status_code == 401
    assert missing.status_code == 401
    assert "key" in error_message(dialect, reply, 401)
    assert len(fake.received) == 2


@pytest.mark.parametrize("dialect", list(FAKES))
async def test_status_fault_uses_the_error_body_and_retry_after(
    client: httpx.AsyncClient, dialect: str
) -> None:
    """Fault.status replies with that code, the dialect's error body and Retry-After."""
    async with make_fake(dialect, dims=8) as fake:
        fake.plan(Fault.status(429, retry_after="3"))
        reply = await post(client, fake, VALID[dialect][0])
    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "3"
    assert "rate limited" in error_message(dialect, reply, 429)


@pytest.mark.parametrize("dialect", [d for d in FAKES if d != "aggregator"])
async def test_only_the_aggregator_serves_rerank(client: httpx.AsyncClient, dialect: str) -> None:
    """Rerank is the aggregator's document alone: every other fake answers 404 there."""
    async with make_fake(dialect, dims=8) as fake:
        reply = await post(
            client, fake, {"model": "r", "query": "q", "documents": ["a"]}, path="/rerank"
        )
    assert reply.status_code == 404
    assert "no such endpoint" in error_message(dialect, reply, 404)


@pytest.mark.parametrize("dialect", [d for d in FAKES if d != "rzenembed"])
async def test_error_body_fault_is_an_error_object_with_200(
    client: httpx.AsyncClient, dialect: str
) -> None:
    """Fault.error_body sends the dialect's documented error object with HTTP 200."""
    async with make_fake(dialect, dims=8) as fake:
        fake.plan(Fault.error_body())
        reply = await post(client, fake, VALID[dialect][0])
    assert reply.status_code == 200
    assert error_message(dialect, reply, 500)
    assert "data" not in reply.json()


# -- RzenEmbed ----------------------------------------------------------------------------


async def test_rzenembed_fuses_text_and_image_and_echoes_request_id(
    client: httpx.AsyncClient,
) -> None:
    """RzenEmbed: texts + images give one fused vector of `dimensions`, the success envelope."""
    body = {
        "model": "RzenEmbed",
        "input": [],
        "dimensions": 256,
        "request_id": "rid-1",
        "instruction": "Find me an everyday image that matches the given caption:",
        "texts": ["two apples"],
        "images": ["http://x/y.png"],
    }
    async with make_fake("rzenembed") as fake:
        reply = await post(client, fake, body)
    payload = reply.json()
    assert reply.status_code == 200
    assert (payload["message"], payload["response_status"]) == ("success", 0)
    assert (payload["request_id"], payload["model"], payload["object"]) == (
        "rid-1",
        "RzenEmbed",
        "list",
    )
    [got] = vectors(reply)
    assert np.array_equal(
        got, fake_vector(item_key(text="two apples", image="http://x/y.png"), 256)
    )
    assert fake.received[0].body["instruction"].startswith("Find me")


async def test_rzenembed_video_is_one_vector_and_request_id_is_generated(
    client: httpx.AsyncClient,
) -> None:
    """RzenEmbed: 2 frames make one video vector; an absent request_id gets a uuid."""
    body = {"model": "RzenEmbed", "video": ["f1", "f2"]}
    async with make_fake("rzenembed", dims=256) as fake:
        reply = await post(client, fake, body)
    assert reply.status_code == 200
    [got] = vectors(reply)
    assert np.array_equal(got, fake_vector(item_key(video=["f1", "f2"]), 256))
    uuid.UUID(reply.json()["request_id"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"texts": ["a", "b"]}, "texts"),
        ({"texts": [], "images": ["i1", "i2"]}, "images"),
        ({"texts": [], "video": ["f1"]}, "video"),
        ({"texts": [], "video": [f"f{i}" for i in range(65)]}, "video"),
        ({"texts": []}, "texts"),
        ({"dimensions": 300}, "dimensions"),
        ({"model": "rzenembed"}, "model"),
        ({"input": "a"}, "input"),
    ],
)
async def test_rzenembed_limits_are_400(
    client: httpx.AsyncClient, change: dict[str, Any], named: str
) -> None:
    """RzenEmbed: ≤1 text, ≤1 image, 2..64 frames, some content, its sizes, model RzenEmbed."""
    async with make_fake("rzenembed") as fake:
        reply = await post(client, fake, VALID["rzenembed"][0] | change)
    assert reply.status_code == 400
    assert named in error_message("rzenembed", reply, 400)


async def test_rzenembed_requires_accept_json(client: httpx.AsyncClient) -> None:
    """RzenEmbed: the document makes `accept: application/json` a required header."""
    async with make_fake("rzenembed") as fake:
        reply = await client.post(
            fake.base_url + "/embeddings",
            json=VALID["rzenembed"][0],
            headers={"Authorization": f"Bearer {KEY}", "accept": "*/*"},
        )
    assert reply.status_code == 400
    assert "accept" in error_message("rzenembed", reply, 400)


# -- CTyun --------------------------------------------------------------------------------


async def test_ctyun_base64_and_token_arrays(client: httpx.AsyncClient) -> None:
    """CTyun: base64 is little-endian float32 under `embeddings`; token arrays are inputs."""
    body = {"model": "m", "input": [[1, 2, 3], [4]], "encoding_format": "base64"}
    async with make_fake("ctyun", dims=16) as fake:
        reply = await post(client, fake, body)
    assert reply.status_code == 200
    assert all("embedding" not in item for item in reply.json()["data"])
    got = vectors(reply, "embeddings")
    assert np.array_equal(got[0], fake_vector(item_key(text="1 2 3"), 16))
    assert np.array_equal(got[1], fake_vector(item_key(text="4"), 16))


async def test_ctyun_dimensions_only_for_text_embedding_3(client: httpx.AsyncClient) -> None:
    """CTyun: `dimensions` is refused unless the model is text-embedding-3 class."""
    async with make_fake("ctyun", dims=16) as fake:
        refused = await post(client, fake, {"model": "4b38a36c", "input": "a", "dimensions": 8})
        allowed = await post(
            client, fake, {"model": "text-embedding-3-large", "input": "a", "dimensions": 8}
        )
    assert refused.status_code == 400
    assert "dimensions" in error_message("ctyun", refused, 400)
    assert np.array_equal(vectors(allowed, "embeddings")[0], fake_vector("t:a", 8))


async def test_ctyun_input_over_8192_tokens_is_400(client: httpx.AsyncClient) -> None:
    """CTyun: an input longer than 8192 tokens (one per character here) is refused."""
    async with make_fake("ctyun", dims=8) as fake:
        reply = await post(client, fake, {"model": "m", "input": ["ok", "x" * 8193]})
    assert reply.status_code == 400
    assert "input[1]" in error_message("ctyun", reply, 400)


# -- SCNet --------------------------------------------------------------------------------


async def test_scnet_accepts_its_dimension_as_string_and_replies_in_shape(
    client: httpx.AsyncClient,
) -> None:
    """SCNet: "dimension": "4096" (the curl sample) is accepted; the reply has id and usage."""
    body = {"model": "Qwen3-Embedding-8B", "input": "a", "dimension": "4096"}
    async with make_fake("scnet") as fake:
        reply = await post(client, fake, body)
    payload = reply.json()
    assert reply.status_code == 200
    assert payload["id"].startswith("embd-")
    assert isinstance(payload["created"], int)
    assert payload["usage"]["completion_tokens"] == 0
    assert payload["usage"]["prompt_cache_hit_tokens"] is None
    assert np.array_equal(vectors(reply)[0], fake_vector("t:a", 4096))


@pytest.mark.parametrize(
    "change",
    [
        {"input": ["a"] * 6},
        {"dimension": "1024"},
        {"dimensions": 1024},
        {"encoding_format": "int8"},
        {"input": "x" * 8193},
    ],
)
async def test_scnet_limits_are_400(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    """SCNet: at most 5 inputs, ≤8192 tokens, the 4096 size cannot change, float|base64."""
    async with make_fake("scnet") as fake:
        reply = await post(client, fake, VALID["scnet"][0] | change)
    assert reply.status_code == 400
    assert error_message("scnet", reply, 400)


async def test_scnet_base64(client: httpx.AsyncClient) -> None:
    """SCNet: encoding_format base64 returns the same vector as little-endian float32."""
    body = {"model": "Qwen3-Embedding-8B", "input": ["a"], "encoding_format": "base64"}
    async with make_fake("scnet", dims=16) as fake:
        reply = await post(client, fake, body)
    assert isinstance(reply.json()["data"][0]["embedding"], str)
    assert np.array_equal(vectors(reply)[0], fake_vector("t:a", 16))


# -- Qianfan ------------------------------------------------------------------------------


async def test_qianfan_native_sizes_and_shape(client: httpx.AsyncClient) -> None:
    """Qianfan: embedding-v1 vectors have 384 values; the reply has an as- id and created."""
    async with make_fake("qianfan") as fake:
        reply = await post(client, fake, {"model": "embedding-v1", "input": ["White T-shirt"]})
    payload = reply.json()
    assert payload["id"].startswith("as-")
    assert (payload["object"], payload["model"]) == ("list", "embedding-v1")
    assert np.array_equal(vectors(reply)[0], fake_vector("t:White T-shirt", 384))


async def test_qianfan_gme_takes_one_text_image_pair(client: httpx.AsyncClient) -> None:
    """Qianfan gme: one {text, image} object makes one fused 1536-value vector."""
    body = {"model": "gme-qwen2-vl-2b-instruct", "input": [{"text": "q", "image": "http://i"}]}
    async with make_fake("qianfan") as fake:
        reply = await post(client, fake, body)
    assert np.array_equal(vectors(reply)[0], fake_vector("t:q|i:http://i", 1536))


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        ("embedding-v1", ["a"] * 17),
        ("embedding-v1", ["x" * 1001]),
        ("bge-large-zh", ["x" * 2001]),
        ("tao-8k", ["a", "b"]),
        ("tao-8k", ["x" * 28001]),
        ("gme-qwen2-vl-2b-instruct", [{"text": "a"}, {"text": "b"}]),
        ("gme-qwen2-vl-2b-instruct", [{"text": ""}]),
        ("gme-qwen2-vl-2b-instruct", ["a"]),
        ("embedding-v1", ["a", ""]),
        ("embedding-v1", []),
        ("embedding-v1", "a"),
    ],
)
async def test_qianfan_limits_are_400(
    client: httpx.AsyncClient, model: str, inputs: list[Any] | str
) -> None:
    """Qianfan: the per-model count and character limits, non-empty texts, one gme object."""
    async with make_fake("qianfan", dims=8) as fake:
        reply = await post(client, fake, {"model": model, "input": inputs})
    assert reply.status_code == 400
    assert error_message("qianfan", reply, 400)


async def test_qianfan_unknown_model_and_base64(client: httpx.AsyncClient) -> None:
    """Qianfan: an unknown model is 404; encoding_format other than float is 400."""
    async with make_fake("qianfan", dims=8) as fake:
        unknown = await post(client, fake, {"model": "nope", "input": ["a"]})
        b64 = await post(
            client, fake, {"model": "tao-8k", "input": ["a"], "encoding_format": "base64"}
        )
    assert unknown.status_code == 404
    assert "nope" in error_message("qianfan", unknown, 404)
    assert b64.status_code == 400


# -- the aggregator -----------------------------------------------------------------------


async def test_aggregator_normalized_false_scales_vectors(client: httpx.AsyncClient) -> None:
    """Aggregator: normalized=false returns 2.5 x the unit vector, so the flag is visible."""
    body = VALID["aggregator"][0] | {"normalized": False, "embedding_type": "base64"}
    async with make_fake("aggregator", dims=8) as fake:
        reply = await post(client, fake, body)
    assert np.array_equal(vectors(reply)[0], fake_vector("t:a", 8) * np.float32(2.5))


@pytest.mark.parametrize(
    "change",
    [
        {"input": ["a"]},
        {"input": [{"text": "", "image": ""}]},
        {"input": []},
        {"normalized": None},
        {"embedding_type": "int8"},
        {"model": ""},
    ],
)
async def test_aggregator_embedding_rules_are_400(
    client: httpx.AsyncClient, change: dict[str, Any]
) -> None:
    """Aggregator: input is non-empty {text, image} objects; normalized, embedding_type given."""
    async with make_fake("aggregator", dims=8) as fake:
        reply = await post(client, fake, VALID["aggregator"][0] | change)
    assert reply.status_code == 400
    assert error_message("aggregator", reply, 400)


async def test_aggregator_rerank_sorts_and_cuts_to_top_n(client: httpx.AsyncClient) -> None:
    """Aggregator rerank: results sorted by rerank_score, cut to top_n unless ignored."""
    documents = [f"doc {i}" for i in range(6)]
    body = {"model": "r", "query": "q", "top_n": 3, "documents": documents}
    expected = sorted(range(6), key=lambda i: -rerank_score("q", documents[i]))
    async with AggregatorFake() as fake:
        cut = (await post(client, fake, body, path="/rerank")).json()
        fake.ignore_top_n = True
        everything = (await post(client, fake, body, path="/rerank")).json()
    assert [r["index"] for r in cut["results"]] == expected[:3]
    assert [r["index"] for r in everything["results"]] == expected
    first = cut["results"][0]
    assert first["document"] == {"text": documents[first["index"]]}
    assert first["relevance_score"] == rerank_score("q", documents[first["index"]])
    assert cut["usage"]["total_tokens"] > 0


async def test_aggregator_rerank_faults_and_rules(client: httpx.AsyncClient) -> None:
    """Aggregator rerank: NaN and shuffled faults reach results; an empty query is 400."""
    body = {"model": "r", "query": "q", "documents": ["a", "b", "c"]}
    async with AggregatorFake() as fake:
        fake.plan(Fault.nan(), Fault.shuffled())
        nan = json.loads((await post(client, fake, body, path="/rerank")).text)
        shuffled = (await post(client, fake, body, path="/rerank")).json()
        empty = await post(client, fake, body | {"query": ""}, path="/rerank")
    assert math.isnan(nan["results"][0]["relevance_score"])
    scores = [r["relevance_score"] for r in shuffled["results"]]
    assert scores == sorted(scores)
    assert empty.status_code == 400


async def test_aggregator_without_key_accepts_any_caller(client: httpx.AsyncClient) -> None:
    """Aggregator: the header is optional in its document, so api_key=None accepts none."""
    async with make_fake("aggregator", api_key=None, dims=8) as fake:
        reply = await post(client, fake, VALID["aggregator"][0], key=None)
    assert reply.status_code == 200


# -- OpenAI-compatible --------------------------------------------------------------------


async def test_openai_dimensions_and_base64(client: httpx.AsyncClient) -> None:
    """OpenAI: dimensions picks the size (1..native); base64 decodes to the same vector."""
    body = {"model": "m", "input": "a", "dimensions": 4, "encoding_format": "base64"}
    async with make_fake("openai", dims=8) as fake:
        reply = await post(client, fake, body)
        too_big = await post(client, fake, body | {"dimensions": 9})
    assert np.array_equal(vectors(reply)[0], fake_vector("t:a", 4))
    assert too_big.status_code == 400
    assert too_big.json()["error"]["param"] == "dimensions"


async def test_max_batch_and_empty_text_are_400(client: httpx.AsyncClient) -> None:
    """OpenAI: max_batch caps the list; an empty string input is refused."""
    async with make_fake("openai", dims=8, max_batch=2) as fake:
        big = await post(client, fake, {"model": "m", "input": ["a", "b", "c"]})
        empty = await post(client, fake, {"model": "m", "input": ["a", ""]})
    assert big.status_code == 400
    assert "at most 2" in error_message("openai", big, 400)
    assert empty.status_code == 400


# -- faults -------------------------------------------------------------------------------

THREE = {"model": "m", "input": ["a", "b", "c"]}
THREE_KEYS = ["t:a", "t:b", "t:c"]


async def test_data_faults_spoil_the_reply(client: httpx.AsyncClient) -> None:
    """wrong_count drops one, duplicate_index repeats one, wrong_dimension shortens one."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.wrong_count(), Fault.duplicate_index(), Fault.wrong_dimension())
        short = (await post(client, fake, THREE)).json()["data"]
        twice = (await post(client, fake, THREE)).json()["data"]
        narrow = await post(client, fake, THREE)
    assert len(short) == 2
    assert [item["index"] for item in twice] == [0, 0, 2]
    assert [len(v) for v in vectors(narrow)] == [7, 8, 8]


async def test_shuffled_keeps_indices_right(client: httpx.AsyncClient) -> None:
    """shuffled reverses data[] but each index still names its input's vector."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.shuffled())
        reply = await post(client, fake, THREE)
    data = reply.json()["data"]
    assert [item["index"] for item in data] == [2, 1, 0]
    for item, got in zip(data, vectors(reply), strict=True):
        assert np.array_equal(got, fake_vector(THREE_KEYS[item["index"]], 8))


async def test_nan_fault_in_float_and_base64(client: httpx.AsyncClient) -> None:
    """nan writes the bare NaN token in float JSON and a float32 NaN in base64."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.nan(), Fault.nan())
        floats = await post(client, fake, THREE)
        packed = await post(client, fake, THREE | {"encoding_format": "base64"})
    assert "[NaN," in floats.text
    assert math.isnan(json.loads(floats.text)["data"][0]["embedding"][0])
    assert math.isnan(float(vectors(packed)[0][0]))
    assert not np.isnan(vectors(packed)[1]).any()


async def test_malformed_and_rzenembed_error_body(client: httpx.AsyncClient) -> None:
    """malformed is 200 with unparseable JSON; RzenEmbed's error_body is status 1002 in 200."""
    async with make_fake("rzenembed") as fake:
        fake.plan(Fault.malformed(), Fault.error_body())
        broken = await post(client, fake, VALID["rzenembed"][0])
        failed = await post(client, fake, VALID["rzenembed"][0])
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.text)
    assert failed.status_code == 200
    assert failed.json()["response_status"] == 1002
    assert failed.json()["data"] == []


async def test_reset_is_a_transport_error_and_the_server_survives(
    client: httpx.AsyncClient,
) -> None:
    """reset closes the connection with no response; the next request is served."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.reset())
        with pytest.raises(httpx.TransportError):
            await post(client, fake, THREE)
        after = await post(client, fake, THREE)
    assert after.status_code == 200
    assert fake.disconnects == 0


async def test_hang_counts_a_disconnect_when_the_client_gives_up(
    client: httpx.AsyncClient,
) -> None:
    """hang never answers; a client timing out shows up in `disconnects`."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.hang())
        with pytest.raises(httpx.ReadTimeout):
            await post(client, fake, THREE, wait_s=0.2)
        assert await eventually_disconnected(fake) == 1
        assert fake.in_flight == 0


async def test_drip_sends_slowly_and_counts_a_disconnect(client: httpx.AsyncClient) -> None:
    """drip sends 200 then one byte per interval; a client deadline shows in `disconnects`."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.drip(0.05))
        async with client.stream(
            "POST",
            fake.base_url + "/embeddings",
            json=THREE,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as reply:
            assert reply.status_code == 200
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reply.aread()
        assert await eventually_disconnected(fake) == 1


async def test_drip_slower_than_the_read_timeout_is_a_read_timeout(
    client: httpx.AsyncClient,
) -> None:
    """drip slower than httpx's per-read timeout raises ReadTimeout and counts a disconnect."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.drip(0.5))
        with pytest.raises(httpx.ReadTimeout):
            await post(client, fake, THREE, wait_s=0.2)
        assert await eventually_disconnected(fake) == 1


async def test_rzenembed_data_faults_on_its_single_item(client: httpx.AsyncClient) -> None:
    """RzenEmbed has one item: duplicate_index repeats it, wrong_count leaves data empty."""
    async with make_fake("rzenembed", dims=256) as fake:
        fake.plan(Fault.duplicate_index(), Fault.wrong_count())
        twice = (await post(client, fake, VALID["rzenembed"][0])).json()
        none = (await post(client, fake, VALID["rzenembed"][0])).json()
    assert [item["index"] for item in twice["data"]] == [0, 0]
    assert none["data"] == []
    assert none["response_status"] == 0


async def test_delay_answers_late_and_counts_cancellation(client: httpx.AsyncClient) -> None:
    """delay answers correctly after the sleep; cancelled mid-sleep it counts a disconnect."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.delay(0.2), Fault.delay(5))
        started = time.monotonic()
        late = await post(client, fake, THREE)
        assert time.monotonic() - started >= 0.2
        assert np.array_equal(vectors(late)[2], fake_vector("t:c", 8))
        with pytest.raises(httpx.ReadTimeout):
            await post(client, fake, THREE, wait_s=0.2)
        assert await eventually_disconnected(fake) == 1


async def test_plan_then_always_then_reset(client: httpx.AsyncClient) -> None:
    """plan applies faults in order, then always; reset clears faults and records."""
    async with make_fake("openai", dims=8) as fake:
        fake.plan(Fault.status(500), None)
        fake.always(Fault.status(503))
        codes = [(await post(client, fake, THREE)).status_code for _ in range(3)]
        fake.reset()
        assert fake.received == []
        assert (await post(client, fake, THREE)).status_code == 200
    assert codes == [500, 200, 503]


async def test_in_flight_peak_and_received_records(client: httpx.AsyncClient) -> None:
    """max_in_flight sees concurrent requests; received keeps path, lower-cased headers, body."""
    async with make_fake("openai", dims=8) as fake:
        fake.always(Fault.delay(0.2))
        replies = await asyncio.gather(*(post(client, fake, THREE) for _ in range(3)))
        unknown = await post(client, fake, THREE, path="/models")
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert unknown.status_code == 404
    assert fake.max_in_flight == 3
    assert fake.in_flight == 0
    assert fake.received[0].path == "/v1/embeddings"
    assert fake.received[0].headers["authorization"] == f"Bearer {KEY}"
    assert fake.received[0].body == THREE
    assert fake.received[-1].path == "/v1/models"
