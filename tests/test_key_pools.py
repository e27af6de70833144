"""A vendor model with a pool of keys, through a real gateway in front of a loopback fake:
a refused key leaves the pool and the call goes on with another; a key told to wait sits
out while the others carry on; every key refused is the operator's problem, said once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import structlog
from conftest import rich_error
from fakes import FakeVendor, Fault, make_fake
from gateways import health_status, running, samples, value

from embedgate.server.app import build_gateway
from embedgate.server.config import ConfigError
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

KEYS = ("key-one", "key-two", "key-three")


def key_files(tmp_path: Path, keys: tuple[str, ...] = KEYS) -> list[str]:
    files = []
    for position, key in enumerate(keys):
        path = tmp_path / f"key-{position}"
        path.write_text(key + "\n")
        files.append(str(path))
    return files


def pooled(fake: FakeVendor, files: list[str]) -> dict[str, Any]:
    return {
        "name": "m",
        "provider": "openai",
        "base_url": fake.base_url,
        "vendor_model": "text-embedding-3-small",
        "api_key_files": files,
        "coalesce_wait_ms": 0,
        "retry_backoff_s": 0.01,
    }


def keys_sent(fake: FakeVendor) -> list[str]:
    return [r.headers["authorization"].removeprefix("Bearer ") for r in fake.received]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key="key-two") as vendor:
        yield vendor


async def embed(stub: pb_grpc.EmbeddingServiceAsyncStub, text: str) -> pb.EmbedResponse:
    reply: pb.EmbedResponse = await stub.Embed(
        pb.EmbedRequest(model="m", inputs=[pb.Input(text=text)]), timeout=10
    )
    return reply


async def test_a_refused_key_leaves_the_pool_and_the_call_goes_on(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """The vendor refuses key-one: that call is served with the next key, key-one is
    never sent again, and the pool's size in service drops to one."""
    async with (
        running([pooled(fake, key_files(tmp_path, KEYS[:2]))]) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with structlog.testing.capture_logs() as logs:
            for i in range(6):
                await embed(stub, f"t{i}")
        found = samples(gateway.metrics.exposition().decode())
    sent = keys_sent(fake)
    assert sent[:2] == ["key-one", "key-two"]
    assert "key-one" not in sent[2:]
    refused = [line for line in logs if line["event"] == "vendor_key_refused"]
    assert [(line["key"], line["keys_in_service"]) for line in refused] == [(0, 1)]
    assert all("key-one" not in str(line) for line in logs)
    in_service = value(found, "embedgate_vendor_keys_in_service", vendor="openai", model="m")
    assert in_service == 1


async def test_a_key_told_to_wait_sits_out_while_the_others_carry_on(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """A 429 with Retry-After on one key: the same call goes on at once with another
    key, and the waiting key is not used until its wait is over."""
    fake.api_key = None  # every key is good
    fake.plan(Fault.status(429, retry_after="30"))
    async with (
        running([pooled(fake, key_files(tmp_path))]) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for i in range(6):
            await embed(stub, f"w{i}")
    sent = keys_sent(fake)
    assert sent[0] == "key-one"
    assert sent[1] == "key-two"  # at once, not after 30 s
    assert "key-one" not in sent[1:]
    assert set(sent[1:]) == {"key-two", "key-three"}


async def test_every_key_refused_is_the_operators_problem(fake: FakeVendor, tmp_path: Path) -> None:
    """When the vendor refuses every key, the call fails with FAILED_PRECONDITION
    (VENDOR_AUTH_FAILED), the model is NOT_SERVING, and later calls send nothing."""
    fake.api_key = "none-of-ours"
    async with (
        running([pooled(fake, key_files(tmp_path))]) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await embed(stub, "x")
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert rich_error(caught.value).reason == "VENDOR_AUTH_FAILED"
        assert len(fake.received) == 3  # each key once, then nothing
        assert await health_status(channel, "m") == "NOT_SERVING"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"api_key_env": "HOME", "api_key_envs": ["HOME"]},
            "give one of api_key_env, api_key_envs",
        ),
        ({"api_key_envs": []}, "models[0].api_key_envs: List should have at least 1"),
    ],
)
def test_a_pool_is_given_one_way(keys: dict[str, Any], message: str) -> None:
    """One key source per model: a single key or a pool, not both."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [{"name": "m", "provider": "scnet", **keys}]}, "embedgate.yaml")
    assert message in str(caught.value)


def test_the_same_key_twice_is_named(tmp_path: Path) -> None:
    """A pool holding one key twice stops start-up naming the second place."""
    files = key_files(tmp_path, ("same", "other", "same"))
    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "provider": "openai",
                    "vendor_model": "text-embedding-3-small",
                    "api_key_files": files,
                }
            ]
        }
    )
    with pytest.raises(ConfigError, match=r"models\[0\]\.api_key_files\[2\]: the same key as"):
        build_gateway(config)
