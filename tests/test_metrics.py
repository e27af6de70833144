"""Prometheus metrics on --metrics-port, read by scraping it after real traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest
from conftest import LOCAL, LocalServed
from fakes import Fault, make_fake
from gateways import key_file, openai_model, running, samples, value
from vendor_world import texts

from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc


async def scrape(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as reply,
    ):
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return await reply.text()


async def test_rpcs_and_vendor_calls_are_counted_by_label(tmp_path: Path) -> None:
    """Every RPC by method, model and code, with its latency; every vendor attempt by
    status, with retries, 429s, latency and inputs per request."""
    async with make_fake("openai", api_key="vendor-key-for-tests", max_batch=4) as fake:
        model = openai_model(fake, key_file(tmp_path), max_batch=4)
        async with running([model], metrics_port=0) as gateway:
            assert gateway.metrics_port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.EmbeddingServiceStub(channel)
                # 6 inputs: two vendor requests (4 + 2).
                await stub.Embed(pb.EmbedRequest(model="m", inputs=texts(*"abcdef")), timeout=10)
                # A 429 (Retry-After: 0), retried once, then 200.
                fake.plan(Fault.status(429, retry_after="0"))
                await stub.Embed(pb.EmbedRequest(model="m", inputs=texts("g")), timeout=10)
                # A 503 on every attempt: 3 attempts (max_retries 2), then UNAVAILABLE.
                fake.always(Fault.status(503))
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Embed(pb.EmbedRequest(model="m", inputs=texts("h")), timeout=10)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                fake.always(None)
                with pytest.raises(grpc.aio.AioRpcError) as invalid:
                    await stub.Embed(pb.EmbedRequest(model="m"), timeout=10)
                assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                stream = stub.StreamEmbed(
                    pb.StreamEmbedRequest(request=pb.EmbedRequest(model="m", inputs=texts("i"))),
                    timeout=10,
                )
                assert len([reply async for reply in stream]) == 1
                await stub.ListModels(pb.ListModelsRequest(), timeout=10)
                # Names callers make up never become label values.
                for name in ("made-up-1", "made-up-2"):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.Embed(pb.EmbedRequest(model=name, inputs=texts("x")))
            found = samples(await scrape(gateway.metrics_port))

    def rpcs(method: str, model: str, code: str) -> float:
        return value(
            found,
            "embedgate_rpcs_total",
            method=method,
            model=model,
            code=code,
            protocol="grpc",
        )

    assert rpcs("Embed", "m", "OK") == 2
    assert rpcs("Embed", "m", "UNAVAILABLE") == 1
    assert rpcs("Embed", "m", "INVALID_ARGUMENT") == 1
    assert rpcs("StreamEmbed", "m", "OK") == 1
    assert rpcs("ListModels", "", "OK") == 1
    assert rpcs("Embed", "(unknown)", "NOT_FOUND") == 2
    assert not any("made-up" in str(labels) for _, labels in found)
    assert (
        value(
            found,
            "embedgate_rpc_duration_seconds_count",
            method="Embed",
            model="m",
            protocol="grpc",
        )
        == 4
    )
    assert (
        value(
            found,
            "embedgate_rpc_duration_seconds_sum",
            method="Embed",
            model="m",
            protocol="grpc",
        )
        > 0
    )
    vendor = {"vendor": "openai", "model": "m"}
    # 2 + (429, 200) + 3 x 503 + 1 (the stream): each attempt counted by its status.
    assert value(found, "embedgate_vendor_requests_total", **vendor, status="200") == 4
    assert value(found, "embedgate_vendor_requests_total", **vendor, status="429") == 1
    assert value(found, "embedgate_vendor_requests_total", **vendor, status="503") == 3
    assert (
        value(found, "embedgate_vendor_retries_total", **vendor) == 3
    )  # 1 after the 429, 2 after 503s
    assert value(found, "embedgate_vendor_rate_limited_total", **vendor) == 1
    assert value(found, "embedgate_vendor_request_duration_seconds_count", **vendor) == 8
    # Inputs per vendor request (counted once per request, not per attempt): 4, 2, 1, 1, 1.
    assert value(found, "embedgate_vendor_request_inputs_count", **vendor) == 5
    assert value(found, "embedgate_vendor_request_inputs_sum", **vendor) == 9
    assert value(found, "embedgate_vendor_request_inputs_bucket", **vendor, le="2.0") == 4
    assert value(found, "embedgate_rpcs_in_flight", method="Embed") == 0
    assert value(found, "embedgate_vendor_requests_in_flight", **vendor) == 0
    assert value(found, "embedgate_model_serving", model="m") == 1
    assert value(found, "process_resident_memory_bytes") > 0


async def test_in_flight_gauges_show_work_under_way(tmp_path: Path) -> None:
    """While two calls wait on a slow vendor, both gauges say 2; then 0."""
    async with make_fake("openai", api_key="vendor-key-for-tests") as fake:
        fake.always(Fault.delay(1.0))
        async with running([openai_model(fake, key_file(tmp_path))], metrics_port=0) as gateway:
            assert gateway.metrics_port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.EmbeddingServiceStub(channel)
                calls = [
                    asyncio.ensure_future(
                        stub.Embed(pb.EmbedRequest(model="m", inputs=texts(t)), timeout=10)
                    )
                    for t in ("slow one", "slow two")
                ]
                for _ in range(100):  # until both reach the vendor, at most 5 s
                    if fake.in_flight == 2:
                        break
                    await asyncio.sleep(0.05)
                during = samples(await scrape(gateway.metrics_port))
                await asyncio.gather(*calls)
            after = samples(await scrape(gateway.metrics_port))
    vendor = {"vendor": "openai", "model": "m"}
    assert value(during, "embedgate_rpcs_in_flight", method="Embed") == 2
    assert value(during, "embedgate_vendor_requests_in_flight", **vendor) == 2
    assert value(after, "embedgate_rpcs_in_flight", method="Embed") == 0
    assert value(after, "embedgate_vendor_requests_in_flight", **vendor) == 0


@pytest.mark.local
async def test_local_model_batch_sizes(local_served: LocalServed) -> None:
    """Concurrent calls to the local model are merged: the histogram sees the batches."""
    metrics = local_served.gateway.metrics
    before = samples(metrics.exposition().decode())
    calls = [
        local_served.stub.Embed(
            pb.EmbedRequest(model=LOCAL, inputs=texts(f"batch text {i}", f"and {i}")), timeout=60
        )
        for i in range(6)
    ]
    await asyncio.gather(*calls)
    after = samples(metrics.exposition().decode())
    name = "embedgate_local_batch_inputs"
    batches = value(after, f"{name}_count", model=LOCAL) - value(
        before, f"{name}_count", model=LOCAL
    )
    texts_seen = value(after, f"{name}_sum", model=LOCAL) - value(
        before, f"{name}_sum", model=LOCAL
    )
    assert texts_seen == 12
    assert 1 <= batches <= 6
