"""The contract's service on the HTTP port over Connect (JSON and binary) and gRPC-Web:
curl with Connect JSON, connect-python's own generated client, and bytes framed by hand
where a client would never send them. The same vectors as gRPC, the same errors with the
same google.rpc details, the caller's timeout as the deadline, an access line and
metrics under each protocol. (Browsers' and Node's Connect clients: test_clients_e2e.py.)"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
import structlog
from connectrpc.client import ResponseMetadata
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from fakes import Fault, make_fake
from gateways import HttpServed, key_file, openai_model, samples, serving_http
from google.protobuf import json_format
from grpc_status import rpc_status
from prometheus_client import generate_latest
from vendor_world import eventually

from embedgate.server.app import build_gateway
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1.embedding_service_connect import EmbeddingServiceClient

SERVICE = "/embedgate.v1.EmbeddingService"


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[HttpServed]:
    async with make_fake("openai", api_key="vendor-key-for-tests") as fake:
        model = openai_model(fake, key_file(tmp_path), timeout_s=30, max_retries=0)
        async with serving_http([model], fake, default_deadline_s=30) as served:
            yield served


def texts(*values: str) -> pb.EmbedRequest:
    return pb.EmbedRequest(model="m", inputs=[pb.Input(text=value) for value in values])


def matrix(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


async def curl(*argv: str) -> tuple[str, str]:
    """Runs curl; its headers and body."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "-D", "-", *argv, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    head, _, body = out.decode().partition("\r\n\r\n")
    return head.lower(), body


async def test_curl_with_connect_json_gets_grpcs_vectors(served: HttpServed) -> None:
    """`curl` posting the contract's JSON to /embedgate.v1.EmbeddingService/Embed gets the
    vectors gRPC's Embed gives, and its request id back as a header."""
    expected = matrix(await served.stub.Embed(texts("apples", "pears")))
    head, body = await curl(
        f"{served.base_url}{SERVICE}/Embed",
        "-H",
        "content-type: application/json",
        "-H",
        "x-request-id: curl-1",
        "-d",
        '{"model": "m", "inputs": [{"text": "apples"}, {"text": "pears"}]}',
    )
    assert head.startswith("http/1.1 200"), head
    assert "x-request-id: curl-1" in head
    reply = json_format.Parse(body, pb.EmbedResponse())
    np.testing.assert_array_equal(matrix(reply), expected)


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
async def test_connect_pythons_client_over_each_protocol(
    served: HttpServed, protocol: ProtocolType
) -> None:
    """connect-python's generated client, binary, over Connect and over gRPC-Web: Embed,
    ListModels and StreamEmbed answer as gRPC does; the request id comes back in a unary
    call's headers and in a stream's trailers."""
    expected = matrix(await served.stub.Embed(texts("apples", "pears", "plums")))
    async with EmbeddingServiceClient(served.base_url, protocol=protocol) as client:
        with ResponseMetadata() as unary:
            embedded = await client.embed(
                texts("apples", "pears", "plums"), headers={"x-request-id": "unary-1"}
            )
        listed = await client.list_models(pb.ListModelsRequest())
        with ResponseMetadata() as stream:
            streamed = [
                item
                async for item in client.stream_embed(
                    pb.StreamEmbedRequest(request=texts("apples", "pears", "plums")),
                    headers={"x-request-id": "stream-1"},
                )
            ]
    np.testing.assert_array_equal(matrix(embedded), expected)
    assert [model.name for model in listed.models] == ["m"]
    assert sorted(item.index for item in streamed) == [0, 1, 2]
    assert unary.headers().get("x-request-id") == "unary-1"
    assert stream.trailers().get("x-request-id") == "stream-1"
    for item in streamed:
        np.testing.assert_array_equal(
            np.array(item.embedding.values, dtype=np.float32), expected[item.index]
        )


async def test_errors_carry_the_same_status_as_grpc(served: HttpServed) -> None:
    """An invalid Embed fails with the same code, message and google.rpc details over
    gRPC, Connect JSON (curl's view) and gRPC-Web."""
    bad = pb.EmbedRequest(model="m", inputs=[pb.Input(text="fine"), pb.Input(text="")])
    with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
        await served.stub.Embed(bad)
    status = rpc_status.from_call(over_grpc.value)
    assert status is not None
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        reply = await http.post(f"{SERVICE}/Embed", json=json_format.MessageToDict(bad))
    async with EmbeddingServiceClient(served.base_url, protocol=ProtocolType.GRPC_WEB) as client:
        with pytest.raises(ConnectError) as over_web:
            await client.embed(bad)
    assert reply.status_code == 400
    error = reply.json()
    assert (error["code"], error["message"]) == ("invalid_argument", status.message)
    assert [d["type"] for d in error["details"]] == [d.TypeName() for d in status.details]
    violation = next(d for d in error["details"] if d["type"] == "google.rpc.BadRequest")
    assert violation["debug"]["fieldViolations"][0]["field"] == "inputs[1].text"
    assert over_web.value.code == Code.INVALID_ARGUMENT
    assert over_web.value.message == status.message
    assert list(over_web.value.details) == list(status.details)


def envelope(message: bytes, flags: int = 0) -> bytes:
    """One length-prefixed message, as Connect streams and gRPC-Web frame them."""
    return struct.pack(">BI", flags, len(message)) + message


async def test_a_body_that_does_not_parse_is_malformed_request(served: HttpServed) -> None:
    """Bytes that are not the method's request, in each framing: INVALID_ARGUMENT with
    reason MALFORMED_REQUEST (as on the gRPC port), never UNKNOWN, and an access line."""
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        with structlog.testing.capture_logs() as logs:
            unknown_field = await http.post(f"{SERVICE}/Embed", json={"modle": "m"})
            not_proto = await http.post(
                f"{SERVICE}/Embed",
                content=b"\xff\xff\xff",
                headers={"content-type": "application/proto"},
            )
            web = await http.post(
                f"{SERVICE}/Embed",
                content=envelope(b"\xff\xff\xff"),
                headers={"content-type": "application/grpc-web+proto"},
            )
    for reply in (unknown_field, not_proto):
        assert reply.status_code == 400
        error = reply.json()
        assert error["code"] == "invalid_argument"
        assert error["details"][0]["debug"]["reason"] == "MALFORMED_REQUEST"
    assert "modle" in unknown_field.json()["message"]
    # gRPC-Web: the status is in the trailer frame that ends the body.
    trailer = web.content[5:].decode()
    assert web.content[0] == 0x80
    assert "grpc-status:3" in trailer.replace(" ", "")
    refused = [entry for entry in logs if entry["event"] == "rpc_finished"]
    assert [(e["method"], e["code"], e["reason"], e["protocol"]) for e in refused] == [
        ("Embed", "INVALID_ARGUMENT", "MALFORMED_REQUEST", "connect"),
        ("Embed", "INVALID_ARGUMENT", "MALFORMED_REQUEST", "connect"),
        ("Embed", "INVALID_ARGUMENT", "MALFORMED_REQUEST", "grpc-web"),
    ]
    assert served.fake.received == []


async def test_a_pipeline_message_that_does_not_parse_ends_the_stream(served: HttpServed) -> None:
    """EmbedPipeline over Connect's streaming framing: a good request is answered, then a
    message that does not parse ends the stream with MALFORMED_REQUEST, as gRPC's does."""
    good = pb.EmbedPipelineRequest(correlation_id="a", request=texts("apples"))
    async with httpx.AsyncClient(base_url=served.base_url, http1=False, http2=True) as http:
        reply = await http.post(
            f"{SERVICE}/EmbedPipeline",
            content=envelope(good.SerializeToString()) + envelope(b"\xff\xff\xff"),
            headers={"content-type": "application/connect+proto"},
        )
    frames = []
    body = reply.content
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        frames.append((flags, body[5 : 5 + size]))
        body = body[5 + size :]
    *messages, (end_flags, end) = frames
    assert end_flags == 0x02
    error = json.loads(end)["error"]
    assert error["code"] == "invalid_argument"
    assert "does not parse" in error["message"]
    answered = [pb.EmbedPipelineResponse.FromString(m) for _, m in messages]
    assert [a.correlation_id for a in answered] in ([], ["a"])  # it may be cut short


async def test_the_timeout_header_is_the_deadline(served: HttpServed) -> None:
    """A vendor that never answers: Connect's Connect-Timeout-Ms and gRPC-Web's
    grpc-timeout end the call with DEADLINE_EXCEEDED at the caller's time, long before
    the server's default deadline (30 s here), each with its access line."""
    served.fake.always(Fault.hang())
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            reply = await http.post(
                f"{SERVICE}/Embed",
                json={"model": "m", "inputs": [{"text": "apples"}]},
                headers={"connect-timeout-ms": "300"},
            )
            async with EmbeddingServiceClient(
                served.base_url, protocol=ProtocolType.GRPC_WEB
            ) as client:
                with pytest.raises(ConnectError) as web:
                    await client.embed(texts("pears"), timeout_ms=300)
            took = time.monotonic() - started
            # The client gives up at the same moment: the server's line may follow.
            assert await eventually(
                lambda: len([e for e in logs if e["event"] == "rpc_finished"]) == 2
            )
    assert reply.status_code == 504
    assert reply.json()["code"] == "deadline_exceeded"
    assert web.value.code == Code.DEADLINE_EXCEEDED
    assert took < 10
    lines = [entry for entry in logs if entry["event"] == "rpc_finished"]
    assert [(e["protocol"], e["code"]) for e in lines] == [
        ("connect", "DEADLINE_EXCEEDED"),
        ("grpc-web", "DEADLINE_EXCEEDED"),
    ]


async def test_calls_are_counted_under_their_protocol(served: HttpServed) -> None:
    """embedgate_rpcs_total tells Connect's and gRPC-Web's calls apart."""
    for protocol in (ProtocolType.CONNECT, ProtocolType.GRPC_WEB):
        async with EmbeddingServiceClient(served.base_url, protocol=protocol) as client:
            await client.embed(texts("apples"))
    found = samples(generate_latest(served.gateway.metrics.registry).decode())
    counted = {
        labels["protocol"]: count
        for (name, label_items), count in found.items()
        if name == "embedgate_rpcs_total" and (labels := dict(label_items))["method"] == "Embed"
    }
    assert counted == {"connect": 1.0, "grpc-web": 1.0}


async def test_a_gzip_body_inflates_no_further_than_the_limit(served: HttpServed) -> None:
    """A gzip body is read as the JSON it holds; one that would inflate past
    server.max_request_bytes (a few kilobytes holding megabytes of zeros) is refused
    before it is inflated further, and one that is not gzip is MALFORMED_REQUEST."""
    good = gzip.compress(b'{"model": "m", "inputs": [{"text": "apples"}]}')
    bomb = gzip.compress(b'{"model": "m", "inputs": [{"text": "' + b"0" * (80 * 1024 * 1024))
    assert len(bomb) < 200 * 1024
    gzipped = {"content-type": "application/json", "content-encoding": "gzip"}
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        with structlog.testing.capture_logs() as logs:
            fine = await http.post(f"{SERVICE}/Embed", content=good, headers=gzipped)
            inflated = await http.post(f"{SERVICE}/Embed", content=bomb, headers=gzipped)
            broken = await http.post(f"{SERVICE}/Embed", content=b"not gzip", headers=gzipped)
    assert fine.status_code == 200
    assert len(fine.json()["embeddings"]) == 1
    assert inflated.status_code == 429
    assert inflated.json()["details"][0]["debug"]["reason"] == "REQUEST_TOO_LARGE"
    assert broken.status_code == 400
    assert broken.json()["details"][0]["debug"]["reason"] == "MALFORMED_REQUEST"
    reasons = [e.get("reason") for e in logs if e["event"] == "rpc_finished"]
    assert reasons == [None, "REQUEST_TOO_LARGE", "MALFORMED_REQUEST"]


async def test_a_caller_that_resets_a_stream_cancels_it_cleanly(tmp_path: Path) -> None:
    """An EmbedPipeline caller that gives up mid-stream (HTTP/2 RST_STREAM): the call
    ends CANCELLED, as gRPC's would, with no internal error logged, and nothing of it
    lingers: the server then stops at once rather than waiting out its grace period."""
    async with make_fake("openai", api_key="vendor-key-for-tests") as fake:
        config = parse_config(
            {
                "server": {"host": "127.0.0.1", "port": 0, "http_port": 0},
                "models": [openai_model(fake, key_file(tmp_path))],
            }
        )
        gateway = build_gateway(config)
        await gateway.start()
        request = pb.EmbedPipelineRequest(correlation_id="a", request=texts("apples"))
        message = request.SerializeToString()

        async def requests() -> AsyncIterator[bytes]:
            yield envelope(message)
            await asyncio.sleep(0.3)
            raise RuntimeError("the caller gives up")

        with structlog.testing.capture_logs() as logs:
            async with httpx.AsyncClient(http1=False, http2=True) as http:
                with pytest.raises(RuntimeError):
                    await http.post(
                        f"http://127.0.0.1:{gateway.http_port}{SERVICE}/EmbedPipeline",
                        content=requests(),
                        headers={"content-type": "application/connect+proto"},
                    )
            assert await eventually(
                lambda: any(e["event"] == "rpc_finished" for e in logs), within_s=5
            )
            started = time.monotonic()
            await gateway.stop(grace=20)
            stopping = time.monotonic() - started
    (line,) = [e for e in logs if e["event"] == "rpc_finished"]
    assert (line["method"], line["code"], line["protocol"]) == (
        "EmbedPipeline",
        "CANCELLED",
        "connect",
    )
    assert not [e for e in logs if e["event"] == "rpc_internal_error"]
    assert stopping < 10  # a task left waiting would hold the stop for the full 20 s
