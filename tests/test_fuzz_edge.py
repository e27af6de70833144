"""No request breaks the edge: requests generated from the contract's descriptors, and
bytes mutated from them, sent over a real channel to a real gateway (vendor fakes and a
text-only model behind it, the default cache on: once a test model shaped like the local
one, once the local model itself, marked `local`). For every one: never INTERNAL or UNKNOWN,
an error always carries ErrorInfo, a rejected request reaches no model, an OK reply has
exactly one vector per input, and the trailers stay under 8 KiB.

Hypothesis runs in a worker thread with blocking channels while the gateway serves on
the test loop. Examples are derandomised, so CI runs the same ones every time;
``EMBEDGATE_FUZZ_EXAMPLES`` asks for more (a few thousand locally) and
``EMBEDGATE_FUZZ_RANDOM=1`` for new ones."""

from __future__ import annotations

import asyncio
import base64
import os
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import PNG_1X1, ScriptedProvider, text_only_model, unpack_status
from fakes import FakeVendor, make_fake
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proto_strategies import MessageStrategies

from embedgate.server.app import build_cache, build_gateway
from embedgate.server.edge.server import Gateway
from embedgate.server.metrics import Metrics
from embedgate.server.providers.registry import build_providers, parse_config
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2 as pb

SERVICE = "/embedgate.v1.EmbeddingService/"
EXAMPLES = int(os.environ.get("EMBEDGATE_FUZZ_EXAMPLES", "400"))
# Set to explore new examples instead of CI's fixed ones.
RANDOM = bool(os.environ.get("EMBEDGATE_FUZZ_RANDOM"))
TRAILER_LIMIT = 8 * 1024
MODELS = ["minilm", "agg", "agg-rerank", "rzen", "openai"]

# Caller mistakes seen in the wild, and shapes urllib.parse refuses.
BAD_URIS = [
    "https://[::1/x.png",
    "http://[::1]x/",
    "https://host:99999/x.png",
    "https://host:port/x.png",
    "http:///no-host.png",
    "ftp://example.com/x.png",
    "data:image/png;base64,AAAA",
    "//example.com/x.png",
    "https://exa mple.com/x.png",
    "https://example.com/x\n.png",
    "https://" + "h" * 9000 + ".example/x.png",
]
GOOD_URIS = [
    "https://images.example/cat.png",
    "http://[::1]:8080/x.png",
    "https://ex.example/a?b=c",
]


def _texts() -> st.SearchStrategy[str]:
    # No spaces in the long ones: one "word", the shape that once passed the token check
    # whatever its length. Lengths sit at the limits (8,192 local, 65,536 vendor).
    long = st.sampled_from([8192, 8193, 65536, 65537, 300_000]).map(lambda n: "x" * n)
    return st.one_of(
        st.sampled_from(["two apples", "a pair of apples", "stock report", " ", ""]),
        st.text(max_size=30),
        long,
    )


def _strategies() -> MessageStrategies:
    model = st.one_of(st.sampled_from(MODELS), st.text(max_size=12), st.just("m" * 5000))
    uri = st.one_of(
        st.sampled_from(GOOD_URIS),
        st.sampled_from(BAD_URIS),
        st.text(max_size=30),
        st.builds(lambda host, path: f"https://{host}/{path}", st.text(max_size=12), st.text()),
    )
    data = st.one_of(
        st.just(PNG_1X1), st.binary(max_size=40), st.binary(max_size=20).map(PNG_1X1.__add__)
    )
    mime = st.one_of(
        st.sampled_from(["image/png", "image/jpeg", "text/plain", "", "IMAGE/PNG; q=1"]),
        st.text(max_size=20),
        st.just("image/" + "x" * 5000),
    )
    ident = st.one_of(st.just(""), st.text(max_size=10), st.just("r" * 5000))
    dims = st.one_of(
        st.sampled_from([0, 1, 16, 64, 256, 384, 1024, 4096]), st.integers(0, 2**32 - 1)
    )
    return MessageStrategies(
        {
            "embedgate.v1.EmbedRequest.model": model,
            "embedgate.v1.RerankRequest.model": model,
            "embedgate.v1.Input.text": _texts(),
            "embedgate.v1.TextImage.text": _texts(),
            "embedgate.v1.RerankRequest.query": _texts(),
            "embedgate.v1.RerankRequest.documents": _texts(),
            "embedgate.v1.Image.uri": uri,
            "embedgate.v1.Image.data": data,
            "embedgate.v1.Image.mime_type": mime,
            "embedgate.v1.EmbedRequest.request_id": ident,
            "embedgate.v1.RerankRequest.request_id": ident,
            "embedgate.v1.EmbedPipelineRequest.correlation_id": ident,
            "embedgate.v1.EmbedRequest.instruction": st.one_of(
                st.just(""), st.text(max_size=10), st.just("i" * 70_000)
            ),
            "embedgate.v1.EmbedRequest.dimensions": dims,
            "embedgate.v1.RerankRequest.top_n": dims,
        },
        max_items=5,
    )


@dataclass(frozen=True)
class Method:
    path: str
    kind: str  # unary | server_stream | bidi
    request: type[Message]


METHODS = [
    Method(SERVICE + "Embed", "unary", pb.EmbedRequest),
    Method(SERVICE + "StreamEmbed", "server_stream", pb.StreamEmbedRequest),
    Method(SERVICE + "Rerank", "unary", pb.RerankRequest),
    Method(SERVICE + "EmbedPipeline", "bidi", pb.EmbedPipelineRequest),
    Method(SERVICE + "ListModels", "unary", pb.ListModelsRequest),
    Method("/grpc.health.v1.Health/Check", "unary", health_pb2.HealthCheckRequest),
    Method(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "bidi",
        reflection_pb2.ServerReflectionRequest,
    ),
]


def _mutate(data: bytes, how: int, at: int, noise: bytes) -> bytes:
    """Bytes that are often no longer the message: flipped, cut, grown or replaced."""
    if how == 0 or not data:
        return noise
    at %= len(data)
    if how == 1:
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    if how == 2:
        return data[:at]
    if how == 3:
        return data[:at] + noise + data[at:]
    return data + noise


def _plausible() -> dict[type[Message], st.SearchStrategy[Any]]:
    """Requests close to what callers send, so that many get through to the models (and
    their replies are checked) while some still break one rule or another."""
    text = st.sampled_from(["two apples", "a pair of apples", "stock report", "", "x" * 9000])
    item = st.one_of(
        text.map(lambda t: pb.Input(text=t)),
        st.sampled_from(GOOD_URIS + BAD_URIS[:2]).map(lambda u: pb.Input(image=pb.Image(uri=u))),
        st.just(pb.Input(image=pb.Image(data=PNG_1X1, mime_type="image/png"))),
        st.just(pb.Input(text_image=pb.TextImage(text="a cat", image=pb.Image(data=PNG_1X1)))),
        st.just(pb.Input(video=pb.Video(frames=[pb.Image(data=PNG_1X1)] * 2))),
    )
    known_outputs = [value.number for value in pb.OutputType.DESCRIPTOR.values]

    def embed(
        model: str, inputs: list[pb.Input], dims: int | None, output: int, cache: bool
    ) -> pb.EmbedRequest:
        request = pb.EmbedRequest(model=model, inputs=inputs, no_cache=cache)
        request.output_type = output  # type: ignore[assignment]  # a number, as on the wire
        if dims is not None:
            request.dimensions = dims
        return request

    embeds = st.builds(
        embed,
        st.sampled_from(MODELS),
        st.lists(item, min_size=1, max_size=4),
        st.one_of(st.none(), st.sampled_from([16, 64, 384, 1024])),
        st.sampled_from(known_outputs),
        st.booleans(),
    )

    def rerank(model: str, query: str, documents: list[str], top_n: int | None) -> Message:
        request = pb.RerankRequest(model=model, query=query, documents=documents)
        if top_n is not None:
            request.top_n = top_n
        return request

    return {
        pb.EmbedRequest: embeds,
        pb.StreamEmbedRequest: embeds.map(lambda r: pb.StreamEmbedRequest(request=r)),
        pb.EmbedPipelineRequest: embeds.map(
            lambda r: pb.EmbedPipelineRequest(correlation_id="c1", request=r)
        ),
        pb.RerankRequest: st.builds(
            rerank,
            st.sampled_from(MODELS),
            text,
            st.lists(text, min_size=1, max_size=4),
            st.one_of(st.none(), st.integers(0, 5)),
        ),
    }


@st.composite
def calls(draw: st.DrawFn) -> tuple[Method, bytes]:
    method = draw(st.sampled_from(METHODS))
    plausible = PLAUSIBLE.get(method.request)
    if plausible is not None and draw(st.booleans()):
        message = draw(plausible)
    else:
        # upb types DESCRIPTOR as its own class; it is the same descriptor API at run time.
        message = draw(STRATEGIES.of(method.request.DESCRIPTOR))  # type: ignore[arg-type]
    data = message.SerializeToString()
    if draw(st.integers(0, 4)) == 0:  # one in five is mutated
        data = _mutate(
            data, draw(st.integers(0, 4)), draw(st.integers(0, 2**16)), draw(st.binary(max_size=24))
        )
    return method, data


STRATEGIES = _strategies()
PLAUSIBLE = _plausible()


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str | bytes], ...]
    replies: list[bytes] = field(default_factory=list)


def _send(channel: grpc.Channel, method: Method, data: bytes) -> Outcome:
    raw = {"request_serializer": bytes, "response_deserializer": bytes}  # bytes as they are
    try:
        if method.kind == "unary":
            reply, done = channel.unary_unary(method.path, **raw).with_call(data, timeout=30)
            return Outcome(done.code(), done.details() or "", done.trailing_metadata(), [reply])
        if method.kind == "server_stream":
            stream = channel.unary_stream(method.path, **raw)(data, timeout=30)
        else:
            stream = channel.stream_stream(method.path, **raw)(iter([data]), timeout=30)
        replies = list(stream)
        return Outcome(stream.code(), stream.details() or "", stream.trailing_metadata(), replies)
    except grpc.RpcError as error:
        failed: Any = error  # a failed call is also its grpc.Call
        return Outcome(failed.code(), failed.details() or "", failed.trailing_metadata() or ())


def trailer_bytes(outcome: Outcome) -> int:
    """What the trailers weigh on the wire, as HPACK counts a header list: name, value
    and 32 bytes each; binary values base64-encoded, grpc-message percent-encoded."""
    size = len("grpc-status") + 2 + 32
    message = urllib.parse.quote(outcome.details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    size += len("grpc-message") + len(message) + 32
    for key, value in outcome.trailers:
        raw = value if isinstance(value, bytes) else value.encode()
        shown = base64.b64encode(raw) if key.endswith("-bin") else raw
        size += len(key) + len(shown) + 32
    return size


def _status(outcome: Outcome) -> status_pb2.Status | None:
    for key, value in outcome.trailers:
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    return None


def _parsed(method: Method, data: bytes) -> Message | None:
    try:
        return method.request.FromString(data)
    except DecodeError:
        return None


def _check_error_status(status: status_pb2.Status, where: str) -> str:
    """An error status a caller can act on: a code other than INTERNAL or UNKNOWN, and
    ErrorInfo in embedgate's domain with a reason. Returns the reason."""
    error = unpack_status(status)
    assert error.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (where, error)
    assert error.reason, (where, error)
    return error.reason


def check(method: Method, data: bytes, outcome: Outcome, model_calls: int) -> int:
    """Assert the properties; return how many vectors the reply carried."""
    where = f"{method.path} {data[:200]!r}"
    assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
        where,
        outcome.code,
        outcome.details,
    )
    assert trailer_bytes(outcome) < TRAILER_LIMIT, (where, trailer_bytes(outcome))
    request = _parsed(method, data)
    if outcome.code != grpc.StatusCode.OK:
        status = _status(outcome)
        if status is None:
            # Health's own answer for a service it does not know: NOT_FOUND, as the
            # grpc.health.v1 protocol says, without details. Ours always have them.
            assert not method.path.startswith(SERVICE), (where, outcome.code, outcome.details)
            assert request is not None, (where, outcome.code)
            return 0
        reason = _check_error_status(status, where)
        assert unpack_status(status).code == outcome.code
        if request is None:
            assert reason == "MALFORMED_REQUEST", (where, reason)
        if not reason.startswith("VENDOR_"):  # the gateway refused it: no model saw it
            assert model_calls == 0, (where, outcome.details, model_calls)
        return 0
    assert request is not None, f"{where}: bytes that do not parse were served"
    if isinstance(request, pb.EmbedRequest):
        (reply,) = outcome.replies
        response = pb.EmbedResponse.FromString(reply)
        assert [e.index for e in response.embeddings] == list(range(len(request.inputs)))
        return len(response.embeddings)
    elif isinstance(request, pb.StreamEmbedRequest):
        # One message per input, each a vector or that input's own error (a vendor may
        # refuse one request of a split call).
        messages = [pb.StreamEmbedResponse.FromString(r) for r in outcome.replies]
        assert sorted(m.index for m in messages) == list(range(len(request.request.inputs)))
        for message in messages:
            if message.HasField("error"):
                reason = _check_error_status(message.error, where)
                assert reason.startswith("VENDOR_"), (where, message.error)
        return sum(m.HasField("embedding") for m in messages)
    elif isinstance(request, pb.RerankRequest):
        (reply,) = outcome.replies
        ranked = pb.RerankResponse.FromString(reply)
        documents = len(request.documents) or len(request.document_inputs)
        indexes = [r.index for r in ranked.results]
        assert len(set(indexes)) == len(indexes)
        assert all(0 <= i < documents for i in indexes)
        wanted = documents if not request.HasField("top_n") else min(documents, request.top_n)
        assert len(indexes) == wanted, where
        return len(indexes)
    elif isinstance(request, pb.EmbedPipelineRequest):
        (reply,) = outcome.replies
        answer = pb.EmbedPipelineResponse.FromString(reply)
        assert answer.correlation_id == request.correlation_id
        if answer.HasField("error"):
            if not _check_error_status(answer.error, where).startswith("VENDOR_"):
                assert model_calls == 0, (where, answer.error.message, model_calls)
            return 0
        embeddings = answer.response.embeddings
        assert [e.index for e in embeddings] == list(range(len(request.request.inputs)))
        return len(embeddings)
    return 0


@dataclass
class FuzzWorld:
    gateway: Gateway
    target: str
    fakes: list[FakeVendor]
    scripted: list[ScriptedProvider]

    def model_calls(self) -> int:
        """Vendor attempts, local forward passes (from the gateway's metrics) and test
        model batches so far."""
        total = 0.0
        for metric in self.gateway.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name in (
                    "embedgate_vendor_requests_total",
                    "embedgate_local_batch_inputs_count",
                ):
                    total += sample.value
        return (
            int(total)
            + sum(len(fake.received) for fake in self.fakes)
            + sum(len(model.calls) for model in self.scripted)
        )


@pytest_asyncio.fixture(
    scope="module", params=["test-model", pytest.param("local-model", marks=pytest.mark.local)]
)
async def fuzz_world(request: pytest.FixtureRequest) -> AsyncIterator[FuzzWorld]:
    """The gateway under fuzz, its text-only `minilm` a test model shaped like the local
    one, or (marked `local`) the local model."""
    fakes = {name: make_fake(name) for name in ("rzenembed", "aggregator", "openai")}
    for fake in fakes.values():
        await fake.start()
    os.environ["EMBEDGATE_FUZZ_KEY"] = "test-key"
    key = {"api_key_env": "EMBEDGATE_FUZZ_KEY", "timeout_s": 10}
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "default_deadline_s": 20},
            "models": [
                {"name": "minilm", "provider": "local", "max_inputs": 8},
                {
                    "name": "agg",
                    "provider": "aggregator",
                    "base_url": fakes["aggregator"].base_url,
                    "vendor_model": "jina-clip-v2",
                    "dimensions": 1024,
                    **key,
                },
                {
                    "name": "agg-rerank",
                    "provider": "aggregator",
                    "task": "rerank",
                    "base_url": fakes["aggregator"].base_url,
                    "vendor_model": "bge-reranker-v2-m3",
                    **key,
                },
                {
                    "name": "rzen",
                    "provider": "rzenembed",
                    "base_url": fakes["rzenembed"].base_url,
                    **key,
                },
                {
                    "name": "openai",
                    "provider": "openai",
                    "base_url": fakes["openai"].base_url,
                    "vendor_model": "text-embedding-3-small",
                    **key,
                },
            ],
        }
    )
    scripted: list[ScriptedProvider] = []
    if request.param == "local-model":
        gateway = build_gateway(config)
    else:
        # As build_gateway composes it, with a test model in the local model's place.
        minilm = text_only_model("minilm", max_inputs=8)
        scripted.append(minilm)
        vendors = [model for model in config.models if model.name != "minilm"]
        metrics = Metrics()
        router = Router(
            [minilm, *build_providers(vendors, metrics=metrics)],
            coalesce_wait_s={model.name: model.coalesce_wait_ms / 1000 for model in vendors},
            cache=build_cache(config.cache),
        )
        gateway = Gateway(router, config.server, metrics=metrics)
    port = await gateway.start()
    yield FuzzWorld(gateway, f"127.0.0.1:{port}", list(fakes.values()), scripted)
    await gateway.stop(grace=1)
    for fake in fakes.values():
        await fake.close()


@pytest.fixture
def blocking_channel(fuzz_world: FuzzWorld) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(fuzz_world.target, options=options) as channel:
        yield channel


async def test_no_generated_or_mutated_request_breaks_the_edge(
    fuzz_world: FuzzWorld, blocking_channel: grpc.Channel
) -> None:
    """For every generated or mutated request: never INTERNAL or UNKNOWN, ErrorInfo on
    every error, no model work for a rejected request, one vector per input on OK, and
    trailers under 8 KiB."""
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=not RANDOM,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(calls())
    def run(call: tuple[Method, bytes]) -> None:
        method, data = call
        before = fuzz_world.model_calls()
        outcome = _send(blocking_channel, method, data)
        vectors = check(method, data, outcome, fuzz_world.model_calls() - before)
        seen[outcome.code.name] = seen.get(outcome.code.name, 0) + 1
        if vectors:
            seen["replies with vectors"] = seen.get("replies with vectors", 0) + 1

    await asyncio.to_thread(run)
    # The run reached the models too, not only the validator.
    assert seen.get("replies with vectors", 0) > EXAMPLES // 20, seen
    assert seen.get("INVALID_ARGUMENT", 0) > EXAMPLES // 10, seen


def test_the_trailer_weight_counts_what_goes_on_the_wire() -> None:
    """The measure used above: a binary value counts base64-encoded, the message
    percent-encoded."""
    outcome = Outcome(
        grpc.StatusCode.INVALID_ARGUMENT, "é" * 10, (("grpc-status-details-bin", b"\x00" * 300),)
    )
    assert trailer_bytes(outcome) == (11 + 2 + 32) + (12 + 60 + 32) + (23 + 400 + 32)
