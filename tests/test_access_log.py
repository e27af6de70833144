"""One access line per RPC, and the request id: from the caller's metadata or field (or
made up), sent back in trailing metadata, and forwarded to the vendor."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from conftest import rich_error
from fakes import FakeVendor, make_fake
from gateways import key_file, openai_model, running

from embedgate.server.logs import configure_logging
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc


def rzen_model(fake: FakeVendor, keys: Path) -> dict[str, Any]:
    return {
        "name": "rzen",
        "provider": "rzenembed",
        "base_url": fake.base_url,
        "api_key_file": str(keys),
        "coalesce_wait_ms": 0,
    }


async def test_request_ids_from_metadata_reach_the_vendor_and_come_back(tmp_path: Path) -> None:
    """A caller's x-request-id (metadata) is the call's request id: it comes back in the
    response and its trailers, reaches the vendor (one derived id per vendor request), and
    names the access line; the request's own field wins over the metadata, and an id too
    long is INVALID_REQUEST_ID."""
    keys = key_file(tmp_path)
    async with (
        make_fake("openai", api_key="vendor-key-for-tests", max_batch=2) as openai,
        make_fake("rzenembed", api_key="vendor-key-for-tests") as rzen,
    ):
        models = [openai_model(openai, keys, max_batch=2), rzen_model(rzen, keys)]
        async with (
            running(models) as gateway,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
        ):
            stub = pb_grpc.EmbeddingServiceStub(channel)
            texts = [pb.Input(text=t) for t in ("a", "b", "c")]
            with structlog.testing.capture_logs() as logs:
                call = stub.Embed(
                    pb.EmbedRequest(model="m", inputs=texts),
                    metadata=(("x-request-id", "trace-7"),),
                    timeout=5,
                )
                reply = await call
                trailing = tuple(await call.trailing_metadata())
                await stub.Embed(
                    pb.EmbedRequest(model="rzen", inputs=texts[:1]),
                    metadata=(("x-request-id", "trace-8"),),
                    timeout=5,
                )
                # The request's own field wins over the metadata.
                await stub.Embed(
                    pb.EmbedRequest(model="m", inputs=texts[:1], request_id="field-9"),
                    metadata=(("x-request-id", "trace-9"),),
                    timeout=5,
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Embed(
                        pb.EmbedRequest(model="m", inputs=texts[:1]),
                        metadata=(("x-request-id", "x" * 129),),
                        timeout=5,
                    )
    assert reply.request_id == "trace-7"
    assert ("x-request-id", "trace-7") in trailing
    # Split in two vendor requests: each its own id, derived from the caller's.
    assert [r.headers["x-request-id"] for r in openai.received] == [
        "trace-7-0",
        "trace-7-2",
        "field-9",
    ]
    assert [r.body["request_id"] for r in rzen.received] == ["trace-8"]
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"x-request-id (metadata)": "INVALID_REQUEST_ID"}
    access = [event for event in logs if event["event"] == "rpc_finished"]
    assert [(e["request_id"], e["code"]) for e in access[:3]] == [
        ("trace-7", "OK"),
        ("trace-8", "OK"),
        ("field-9", "OK"),
    ]
    first = access[0]
    assert first["method"] == "Embed"
    assert first["model"] == "m"
    assert first["inputs"] == 3
    assert first["vendor_calls"] == 2
    assert first["duration_ms"] > 0


async def test_access_lines_render_as_json_without_the_callers_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole pipeline, as `serve` configures it: one JSON line per RPC, and the
    bearer token the caller sent appears nowhere, even when it is refused."""
    canary = "bearer-canary-0b5e"
    token_file = tmp_path / "token"
    token_file.write_text(canary)
    auth = {"tokens": [{"name": "app", "token_file": str(token_file)}]}
    handlers = logging.getLogger().handlers[:]
    configure_logging(json=True)
    # Module loggers would otherwise keep this test's captured stderr after it ends.
    structlog.configure(cache_logger_on_first_use=False)
    try:
        async with make_fake("openai", api_key="vendor-key-for-tests") as fake:
            model = openai_model(fake, key_file(tmp_path))
            async with (
                running([model], auth=auth) as gateway,
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
            ):
                stub = pb_grpc.EmbeddingServiceStub(channel)
                request = pb.EmbedRequest(model="m", inputs=[pb.Input(text="a")])
                await stub.Embed(request, metadata=(("authorization", f"Bearer {canary}"),))
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Embed(request, metadata=(("authorization", f"Bearer {canary}x"),))
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = handlers
    records = [json.loads(line) for line in lines]
    access = [r for r in records if r["event"] == "rpc_finished"]
    assert [(r["code"], r.get("reason")) for r in access] == [
        ("OK", None),
        ("UNAUTHENTICATED", "INVALID_TOKEN"),
    ]
    assert all(canary not in line for line in lines)
