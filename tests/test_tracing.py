"""OpenTelemetry traces, exported to a real OTLP receiver on loopback: one trace from the
caller's traceparent through the RPC, validation, cache, batch and vendor spans to the
vendor itself; fan-in links for a request shared by several callers; the standard
variables and the gRPC exporter; no span when tracing is off; never an input or a key
in a span."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from fakes import FakeVendor, Fault, make_fake
from gateways import KEY, deployment, key_file, openai_model, running
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp import Received, attributes, grpc_receiver, http_receiver
from vendor_world import eventually

from embedgate.server import tracing
from embedgate.server.edge.server import Gateway
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

EMBED = "embedgate.v1.EmbeddingService/Embed"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key=KEY) as vendor:
        yield vendor


@pytest.fixture(autouse=True)
def no_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says itself whether tracing is on."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def traceparent() -> tuple[str, str, str]:
    """A caller's W3C traceparent, with its trace id and span id (hex)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def embed(
    gateway: Gateway, texts: list[str], metadata: tuple[tuple[str, str], ...] = ()
) -> dict[str, str]:
    """An Embed call; its trailing metadata."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(model="m", inputs=[pb.Input(text=t) for t in texts]),
            metadata=metadata,
        )
        await call
        trailing = await call.trailing_metadata()
    return {key: value for key, value in trailing or () if isinstance(value, str)}


def by_name(received: Received, trace_id: str) -> dict[str, Span]:
    """The spans of one trace, by name (each name once)."""
    spans = [s for s in received.spans if s.trace_id.hex() == trace_id]
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


async def test_one_trace_from_the_caller_to_the_vendor(fake: FakeVendor, tmp_path: Path) -> None:
    """A caller's traceparent is the parent of the RPC's server span (RPC conventions),
    under which validation, the cache lookup, the wait, the batch, the vendor request
    (GenAI conventions) and its HTTP attempt nest; the vendor receives the same trace
    in its own traceparent, and the caller gets the trace id back."""
    parent, trace_id, caller_span = traceparent()
    async with http_receiver() as (endpoint, received):
        settings = {"enabled": True, "endpoint": endpoint, "protocol": "http/protobuf"}
        model = openai_model(fake, key_file(tmp_path))
        async with running([model], cache=True, tracing=settings) as gateway:
            trailing = await embed(gateway, ["apples"], (("traceparent", parent),))
        assert not tracing.active()  # the stop turned it off, after sending every span
    spans = by_name(received, trace_id)
    assert set(spans) == {
        EMBED,
        "embedgate.validate",
        "embedgate.cache.lookup",
        "embedgate.batch.wait",
        "embedgate.batch",
        "embeddings text-embedding-3-small",
        "POST",
    }
    server = spans[EMBED]
    assert server.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert server.parent_span_id.hex() == caller_span
    assert attributes(server) | {"rpc.system": "grpc"} == attributes(server)
    assert {
        key: attributes(server)[key]
        for key in ("rpc.service", "rpc.method", "rpc.grpc.status_code", "embedgate.model")
    } == {
        "rpc.service": "embedgate.v1.EmbeddingService",
        "rpc.method": "Embed",
        "rpc.grpc.status_code": 0,
        "embedgate.model": "m",
    }
    assert trailing["x-trace-id"] == trace_id

    def parent_of(name: str) -> str:
        return next(n for n, s in spans.items() if s.span_id == spans[name].parent_span_id)

    assert parent_of("embedgate.validate") == EMBED
    assert parent_of("embedgate.cache.lookup") == EMBED
    assert attributes(spans["embedgate.cache.lookup"])["embedgate.cache.misses"] == 1
    assert parent_of("embedgate.batch") == EMBED
    assert [link.span_id for link in spans["embedgate.batch"].links] == [server.span_id]
    vendor = spans["embeddings text-embedding-3-small"]
    assert parent_of("embeddings text-embedding-3-small") == "embedgate.batch"
    assert {
        key: attributes(vendor)[key]
        for key in (
            "gen_ai.operation.name",
            "gen_ai.request.model",
            "gen_ai.usage.input_tokens",
            "embedgate.deployment",
        )
    } == {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.request.model": "text-embedding-3-small",
        "gen_ai.usage.input_tokens": 6,  # the fake counts a token per character
        "embedgate.deployment": "m",
    }
    attempt = spans["POST"]
    assert attempt.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert parent_of("POST") == "embeddings text-embedding-3-small"
    assert attributes(attempt)["http.response.status_code"] == 200
    assert attributes(attempt)["url.full"] == fake.base_url.rstrip("/") + "/embeddings"
    assert attributes(attempt)["embedgate.attempt"] == 1
    assert attributes(attempt)["gen_ai.request.model"] == "text-embedding-3-small"
    assert attributes(attempt)["embedgate.deployment"] == "m"
    # The vendor heard of the same trace, from the attempt's span.
    (sent,) = fake.received
    assert sent.headers["traceparent"] == f"00-{trace_id}-{attempt.span_id.hex()}-01"


async def test_a_request_shared_by_callers_links_to_each(fake: FakeVendor, tmp_path: Path) -> None:
    """Two callers' inputs in one vendor request: one batch span, linked to each
    caller's RPC span; each caller's wait links back to the batch."""
    first, first_trace, _ = traceparent()
    second, second_trace, _ = traceparent()
    async with http_receiver() as (endpoint, received):
        settings = {"enabled": True, "endpoint": endpoint}
        model = openai_model(fake, key_file(tmp_path), coalesce_wait_ms=300)
        async with running([model], tracing=settings) as gateway:
            # A call held at the vendor: while it is in flight, the next calls wait for
            # company instead of leaving at once.
            fake.plan(Fault.delay(0.5))
            pacer = asyncio.ensure_future(embed(gateway, ["pacer"]))
            assert await eventually(lambda: len(fake.received) == 1)
            await asyncio.gather(
                embed(gateway, ["apples"], (("traceparent", first),)),
                embed(gateway, ["pears"], (("traceparent", second),)),
            )
            await pacer
    assert sorted(fake.received[1].body["input"]) == ["apples", "pears"]  # one request
    batches = received.named("embedgate.batch")
    (batch,) = [b for b in batches if b.trace_id.hex() in (first_trace, second_trace)]
    mine = (first_trace, second_trace)
    servers = {s.trace_id.hex(): s for s in received.named(EMBED) if s.trace_id.hex() in mine}
    assert set(servers) == set(mine)
    assert {link.span_id for link in batch.links} == {s.span_id for s in servers.values()}
    assert attributes(batch)["embedgate.callers"] == 2
    waits = [w for w in received.named("embedgate.batch.wait") if w.trace_id.hex() in mine]
    assert len(waits) == 2
    for wait in waits:
        assert [link.span_id for link in wait.links] == [batch.span_id]
    # The vendor request is the batch's child, in the batch's trace.
    vendor = [
        v
        for v in received.named("embeddings text-embedding-3-small")
        if v.trace_id == batch.trace_id
    ]
    assert [v.parent_span_id for v in vendor] == [batch.span_id]


async def test_the_standard_variables_and_the_grpc_exporter(
    fake: FakeVendor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no tracing section, OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on, and
    OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are
    followed: the spans reach an OTLP/gRPC receiver with that resource. A call that
    sent no traceparent starts its own trace."""
    async with grpc_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "embedgate-under-test")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci")
        async with running([openai_model(fake, key_file(tmp_path))]) as gateway:
            trailing = await embed(gateway, ["apples"])
    (server,) = received.named(EMBED)
    assert server.trace_id.hex() == trailing["x-trace-id"]
    assert not server.parent_span_id
    resource = received.resource_attributes()
    assert resource["service.name"] == "embedgate-under-test"
    assert resource["deployment.environment"] == "ci"


async def test_tracing_off_sends_nothing(fake: FakeVendor, tmp_path: Path) -> None:
    """Without the section or the variables, tracing is off: the receiver gets nothing,
    the caller gets no trace id, and no span is made."""
    parent, _, _ = traceparent()
    async with (
        http_receiver() as (_endpoint, received),
        running([openai_model(fake, key_file(tmp_path))]) as gateway,
    ):
        assert not tracing.active()
        trailing = await embed(gateway, ["apples"], (("traceparent", parent),))
    assert received.requests == []
    assert "x-trace-id" not in trailing
    assert "traceparent" not in fake.received[0].headers


async def test_no_input_or_key_goes_into_a_span(fake: FakeVendor, tmp_path: Path) -> None:
    """A canary text, a canary caller name's value and the vendor key appear nowhere in
    what the receiver got, for a call that succeeds and one that fails."""
    canary = "canary-input-" + secrets.token_hex(6)
    async with http_receiver() as (endpoint, received):
        settings = {"enabled": True, "endpoint": endpoint}
        async with running([openai_model(fake, key_file(tmp_path))], tracing=settings) as gateway:
            await embed(gateway, [canary, f"{canary} again"])
            with pytest.raises(grpc.aio.AioRpcError):
                await embed(gateway, [canary, ""])
    raw = received.raw()
    assert received.named(EMBED)
    assert canary.encode() not in raw
    assert KEY.encode() not in raw


async def test_an_http_door_joins_the_callers_trace(fake: FakeVendor, tmp_path: Path) -> None:
    """The OpenAI door reads traceparent from the HTTP headers and answers the trace id
    in x-trace-id; its span names the door."""
    parent, trace_id, caller_span = traceparent()
    async with http_receiver() as (endpoint, received):
        settings = {"enabled": True, "endpoint": endpoint}
        model = openai_model(fake, key_file(tmp_path))
        async with (
            running([model], http_port=0, tracing=settings) as gateway,
            httpx.AsyncClient() as http,
        ):
            reply = await http.post(
                f"http://127.0.0.1:{gateway.http_port}/v1/embeddings",
                json={"model": "m", "input": "apples"},
                headers={"traceparent": parent},
            )
    assert reply.headers["x-trace-id"] == trace_id
    (server,) = received.named(EMBED)
    assert server.parent_span_id.hex() == caller_span
    assert attributes(server)["embedgate.protocol"] == "openai"


@pytest.mark.local
async def test_the_local_models_forward_pass_is_a_span(tmp_path: Path) -> None:
    """A call to the local model shows its forward pass, in the caller's trace."""
    parent, trace_id, _ = traceparent()
    async with http_receiver() as (endpoint, received):
        settings: dict[str, Any] = {"enabled": True, "endpoint": endpoint}
        local = {"name": "m", "provider": "local"}
        async with running([local], tracing=settings) as gateway:
            await embed(gateway, ["apples"], (("traceparent", parent),))
    spans = by_name(received, trace_id)
    forward = spans["embedgate.local.forward"]
    assert attributes(forward)["embedgate.inputs"] == 1
    assert forward.parent_span_id == spans[EMBED].span_id


async def test_a_deployments_turn_names_it_and_its_breaker(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """For a model with deployments, the deployment that served is a span with its
    breaker's state and the attempt number, which its HTTP attempts repeat."""
    keys = key_file(tmp_path)
    model = {
        "name": "m",
        "coalesce_wait_ms": 0,
        "deployments": [deployment(fake, keys, "only")],
    }
    async with http_receiver() as (endpoint, received):
        settings = {"enabled": True, "endpoint": endpoint}
        async with running([model], tracing=settings) as gateway:
            await embed(gateway, ["apples"])
    (turn,) = received.named("embedgate.deployment")
    assert attributes(turn) == {
        "embedgate.deployment": "only",
        "embedgate.breaker_state": "closed",
        "embedgate.attempt": 1,
    }
    (attempt,) = received.named("POST")
    assert attributes(attempt)["embedgate.breaker_state"] == "closed"
    assert attributes(attempt)["embedgate.deployment"] == "only"
