"""A real gateway in front of loopback fakes of every vendor, configured the way the
README shows: the session-wide fixture the vendor and coalescing tests share, and the
helpers they call with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from conftest import RichError, rich_error
from fakes import FAKES, FakeVendor, fake_vector, item_key, make_fake
from google.rpc import error_details_pb2, status_pb2

from embedgate.server.app import build_gateway
from embedgate.server.edge.server import Gateway
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

CANARY = "sk-canary-3c1e55d0"
IMAGE_URL = "https://images.example/cat.png"
# The models the fault tests run against: one per dialect.
DIALECT_MODELS = ("rzen", "ctyun", "scnet", "qianfan-v1", "agg", "openai")


@dataclass
class VendorWorld:
    stub: pb_grpc.EmbeddingServiceAsyncStub
    fakes: dict[str, FakeVendor]
    gateway: Gateway
    target: str
    # The HTTP port's address (the OpenAI API, Connect and gRPC-Web).
    http_target: str

    def fake_of(self, model: str) -> FakeVendor:
        return self.fakes[MODEL_VENDOR[model]]


MODEL_VENDOR = {
    "rzen": "rzenembed",
    "rzen-mrl": "rzenembed",
    "ctyun": "ctyun",
    "scnet": "scnet",
    "scnet-mrl": "scnet",
    "qianfan-v1": "qianfan",
    "qianfan-tao": "qianfan",
    "qianfan-gme": "qianfan",
    "agg": "aggregator",
    "agg-rerank": "aggregator",
    "openai": "openai",
    "rzen-patient": "rzenembed",
    "openai-quick": "openai",
    "openai-merge": "openai",
}


def model_entries(fakes: dict[str, FakeVendor], key_file: Path) -> list[dict[str, Any]]:
    """The models, written as a user would write them in the YAML file."""
    fast = {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "timeout_s": 10}
    key = {"api_key_file": str(key_file)}

    def at(vendor: str) -> dict[str, Any]:
        return {"base_url": fakes[vendor].base_url, **key, **fast}

    return [
        {"name": "rzen", "provider": "rzenembed", **at("rzenembed")},
        {
            "name": "rzen-mrl",
            "provider": "rzenembed",
            "dimensions": 1024,
            "matryoshka": True,
            "instruction": "Represent this for retrieval:",
            **at("rzenembed"),
        },
        {
            "name": "ctyun",
            "provider": "ctyun",
            "vendor_model": "4b38a36cabe247c8a996206984c9e2a61",
            "dimensions": 1024,
            "max_batch": 4,
            **at("ctyun"),
        },
        {"name": "scnet", "provider": "scnet", **at("scnet")},
        {"name": "scnet-mrl", "provider": "scnet", "matryoshka": True, **at("scnet")},
        {
            "name": "qianfan-v1",
            "provider": "qianfan",
            "vendor_model": "embedding-v1",
            **at("qianfan"),
        },
        {"name": "qianfan-tao", "provider": "qianfan", "vendor_model": "tao-8k", **at("qianfan")},
        {
            "name": "qianfan-gme",
            "provider": "qianfan",
            "vendor_model": "gme-qwen2-vl-2b-instruct",
            **at("qianfan"),
        },
        {
            "name": "agg",
            "provider": "aggregator",
            "vendor_model": "jina-clip-v2",
            "dimensions": 1024,
            "max_batch": 8,
            **at("aggregator"),
        },
        {
            "name": "agg-rerank",
            "provider": "aggregator",
            "vendor_model": "bge-reranker-v2-m3",
            "task": "rerank",
            "max_batch": 4,
            **at("aggregator"),
        },
        {
            "name": "openai",
            "provider": "openai",
            "vendor_model": "text-embedding-3-small",
            "max_batch": 8,
            "max_concurrency": 2,
            **at("openai"),
        },
        # No retries and a long attempt limit: the server's default deadline ends it.
        {"name": "rzen-patient", "provider": "rzenembed", "max_retries": 0, **at("rzenembed")},
        # A long coalescing wait, so concurrent calls surely meet in one batch.
        {
            "name": "openai-merge",
            "provider": "openai",
            "vendor_model": "text-embedding-3-small",
            "max_batch": 8,
            "coalesce_wait_ms": 100,
            **at("openai"),
        },
        # A short attempt limit: a hung attempt is abandoned and retried.
        {
            "name": "openai-quick",
            "provider": "openai",
            "vendor_model": "text-embedding-3-small",
            **at("openai"),
            "timeout_s": 0.3,
            "coalesce_wait_ms": 0,
        },
    ]


@pytest_asyncio.fixture(scope="session")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VendorWorld]:
    # One fake per vendor the gateway registers; model_entries points the models at them.
    fakes = {vendor: make_fake(vendor, api_key=CANARY) for vendor in FAKES}
    for fake in fakes.values():
        await fake.start()
    key_file = tmp_path_factory.mktemp("secrets") / "vendor-key"
    key_file.write_text(CANARY + "\n")
    config = parse_config(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "http_port": 0,
                "default_deadline_s": 2.0,
            },
            # These tests watch every input reach the vendor; tests/test_cache.py has
            # the cache in front of the same fakes.
            "cache": {"enabled": False},
            "models": model_entries(fakes, key_file),
        }
    )
    gateway = build_gateway(config)
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield VendorWorld(
        pb_grpc.EmbeddingServiceStub(channel),
        fakes,
        gateway,
        f"127.0.0.1:{port}",
        f"127.0.0.1:{gateway.http_port}",
    )
    await channel.close()
    await gateway.stop(grace=1)
    for fake in fakes.values():
        await fake.close()


@pytest.fixture(autouse=True)
def fresh_fakes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with fakes that behave and have received nothing."""
    if "world" not in request.fixturenames:
        yield
        return
    world: VendorWorld = request.getfixturevalue("world")
    for fake in world.fakes.values():
        fake.reset()
    yield


def texts(*values: str) -> list[pb.Input]:
    return [pb.Input(text=value) for value in values]


def rows(response: pb.EmbedResponse) -> npt.NDArray[np.float32]:
    assert [e.index for e in response.embeddings] == list(range(len(response.embeddings)))
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def expected(keys: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
    return np.stack([fake_vector(key, dims) for key in keys])


def text_keys(values: Sequence[str]) -> list[str]:
    return [item_key(text=value) for value in values]


async def embed(
    world: VendorWorld,
    model: str,
    inputs: Sequence[pb.Input],
    deadline_s: float = 10,
    **options: Any,
) -> pb.EmbedResponse:
    request = pb.EmbedRequest(model=model, inputs=inputs, **options)
    response: pb.EmbedResponse = await world.stub.Embed(request, timeout=deadline_s)
    return response


async def embed_fails(
    world: VendorWorld,
    model: str,
    inputs: Sequence[pb.Input],
    deadline_s: float = 10,
    **options: Any,
) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(world, model, inputs, deadline_s=deadline_s, **options)
    return rich_error(caught.value)


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Is(info.DESCRIPTOR):
                    detail.Unpack(info)
                    seconds: float = info.retry_delay.ToTimedelta().total_seconds()
                    return seconds
    return None


async def eventually(condition: Any, within_s: float = 3.0) -> bool:
    deadline = time.perf_counter() + within_s
    while time.perf_counter() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    raise AssertionError("the condition did not hold in time")
