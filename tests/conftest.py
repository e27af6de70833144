"""Shared fixtures: real gateways on 127.0.0.1:0 for the whole session, reached over real
grpc.aio channels. `served`, for the edge tests, serves deterministic in-process test
models (no torch); `local_served` serves the embedded local model, for the tests marked
`local` (the only tests that may load it).

With EMBEDGATE_TEST_WITHOUT_TORCH=1 the run is as on a machine without the [local] extra
(tests/without_torch.py): torch cannot be imported, and only tests not marked `local`
may be selected."""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import without_torch
from google.rpc import error_details_pb2, status_pb2

from embedgate.server.config import DEFAULT_MODEL_NAME, ServerConfig
from embedgate.server.domain import (
    Dimensions,
    EmbedOptions,
    ImageInput,
    Input,
    Modality,
    ModelInfo,
    TextImageInput,
    TextInput,
    VideoInput,
)
from embedgate.server.edge.server import Gateway
from embedgate.server.errors import ModelUnavailableError, Part, Problem, Reason
from embedgate.server.metrics import Metrics
from embedgate.server.providers.base import EmbedBatch
from embedgate.server.providers.local import LocalProvider, LocalSettings
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

if without_torch.requested():
    _stubs = Path(tempfile.mkdtemp(prefix="embedgate-without-torch-"))
    atexit.register(shutil.rmtree, _stubs, ignore_errors=True)
    without_torch.block(_stubs)

# The gateway in front of the vendor fakes (fixture `world`).
pytest_plugins = ["vendor_world", "redis_server"]

LOCAL = DEFAULT_MODEL_NAME
# Test models: text only, shaped like the local model (384 dimensions, 512 inputs, 8,192
# characters, reranks, no instruction, unit vectors); every modality; wide vectors.
TEXT_ONLY = "test-text"
MULTI = "test-multimodal"
WIDE = "test-wide"

# The smallest valid PNG: a 1x1 transparent pixel.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def input_key(item: Input) -> bytes:
    """The content of an input as bytes, so a vector can be traced back to it."""
    if isinstance(item, TextInput):
        return b"text:" + item.text.encode()
    if isinstance(item, ImageInput):
        return b"image:" + (item.image.uri or "").encode() + (item.image.data or b"")
    if isinstance(item, VideoInput):
        return b"video:" + b"|".join((f.uri or "").encode() + (f.data or b"") for f in item.frames)
    assert isinstance(item, TextImageInput)
    return b"text_image:" + item.text.encode() + (item.image.uri or "").encode()


def expected_vector(item: Input, dims: int) -> npt.NDArray[np.float32]:
    """What the test model returns for ``item``: a unit vector derived from its content."""
    seed = int.from_bytes(hashlib.sha256(input_key(item)).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return vector / np.linalg.norm(vector)


@dataclass
class ScriptedProvider:
    """A deterministic model for the tests: every modality unless told otherwise, vectors
    derived from the content, and switchable behaviour (delays, failing inputs) to
    exercise the routing and edge layers. It implements the provider seam; nothing is
    patched."""

    name: str
    dims: int = 16
    batch: int = 4
    max_inputs: int = 512
    delay_s: float = 0.0
    fail_texts: set[str] = field(default_factory=set)
    modalities: frozenset[Modality] = frozenset(Modality)
    max_text_chars: int = 65536
    reranks: bool = False
    accepts_instruction: bool = True
    normalizes_by_default: bool = False
    calls: list[int] = field(default_factory=list)
    # Every input its own checks were given (the router's checks come first).
    checked: list[Input] = field(default_factory=list)
    in_flight: int = 0
    started_since_delay: int = 0

    def slow_down(self, delay_s: float) -> None:
        """Make the n-th batch from now take delay_s / n seconds (0 turns it off)."""
        self.delay_s = delay_s
        self.started_since_delay = 0

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            provider="test",
            modalities=self.modalities,
            max_inputs_per_call=self.max_inputs,
            max_text_chars=self.max_text_chars,
            dimensions=Dimensions(default=self.dims, minimum=1, maximum=self.dims),
            reranks=self.reranks,
            accepts_instruction=self.accepts_instruction,
            normalizes_by_default=self.normalizes_by_default,
        )

    @property
    def max_batch(self) -> int:
        return self.batch

    @property
    def waiting(self) -> int:
        return 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        self.checked.extend(inputs)
        return [
            Problem(Part.TEXT, "is the word the test model refuses", Reason.INPUT_TOO_LONG, i)
            for i, item in enumerate(inputs)
            if isinstance(item, TextInput) and item.text == "refuse"
        ]

    async def embed(self, inputs: Sequence[Input], options: EmbedOptions) -> EmbedBatch:
        self.calls.append(len(inputs))
        self.in_flight += 1
        self.started_since_delay += 1
        try:
            # Later batches finish first, so order is the router's job, not luck's.
            if self.delay_s:
                await asyncio.sleep(self.delay_s / self.started_since_delay)
            for item in inputs:
                if isinstance(item, TextInput) and item.text in self.fail_texts:
                    raise ModelUnavailableError(f"the test model failed on {item.text!r}")
            vectors = np.stack([expected_vector(item, self.dims) for item in inputs]).astype(
                np.float32
            )
            return EmbedBatch(vectors=vectors * 2.0, tokens=tuple(1 for _ in inputs))
        finally:
            self.in_flight -= 1


def text_only_model(name: str = TEXT_ONLY, max_inputs: int = 512) -> ScriptedProvider:
    """A test model shaped like the local one: text only, 384 dimensions, at most 8,192
    characters a text, reranks by cosine, no instruction, unit vectors by default."""
    return ScriptedProvider(
        name,
        dims=384,
        batch=32,
        max_inputs=max_inputs,
        modalities=frozenset({Modality.TEXT}),
        max_text_chars=8192,
        reranks=True,
        accepts_instruction=False,
        normalizes_by_default=True,
    )


def ranking(model: ScriptedProvider, query: str, documents: Sequence[str]) -> list[int]:
    """The document indexes best first, as a cosine rerank on ``model`` orders them."""
    want = expected_vector(TextInput(query), model.dims)
    scores = [float(expected_vector(TextInput(d), model.dims) @ want) for d in documents]
    return sorted(range(len(documents)), key=lambda i: -scores[i])


@dataclass
class Served:
    """The edge tests' gateway: the test models only."""

    gateway: Gateway
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.EmbeddingServiceAsyncStub
    text: ScriptedProvider
    multi: ScriptedProvider
    wide: ScriptedProvider


@dataclass
class LocalServed:
    """The local model's gateway, for the tests marked `local`."""

    gateway: Gateway
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.EmbeddingServiceAsyncStub
    local: LocalProvider


def server_settings() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=5)


def big_message_channel(target: str) -> grpc.aio.Channel:
    """A channel that sends and receives the largest payloads the gateway admits."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", 80 * 1024 * 1024),
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ],
    )


@pytest_asyncio.fixture(scope="session")
async def served() -> AsyncIterator[Served]:
    text = text_only_model()
    multi = ScriptedProvider(MULTI, dims=16, batch=4, fail_texts={"explode"})
    wide = ScriptedProvider(WIDE, dims=4096, batch=64, max_inputs=512)
    gateway = Gateway(Router([text, multi, wide]), server_settings(), metrics=Metrics())
    port = await gateway.start()
    target = f"127.0.0.1:{port}"
    channel = big_message_channel(target)
    yield Served(gateway, target, channel, pb_grpc.EmbeddingServiceStub(channel), text, multi, wide)
    await channel.close()
    await gateway.stop(grace=1)


@pytest_asyncio.fixture(scope="session")
async def local_served() -> AsyncIterator[LocalServed]:
    metrics = Metrics()
    local = LocalProvider(LocalSettings(name=LOCAL), metrics)
    gateway = Gateway(Router([local]), server_settings(), metrics=metrics)
    port = await gateway.start()
    target = f"127.0.0.1:{port}"
    channel = big_message_channel(target)
    yield LocalServed(gateway, target, channel, pb_grpc.EmbeddingServiceStub(channel), local)
    await channel.close()
    await gateway.stop(grace=1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Only tests marked `local` load the local model; a run without torch selects none."""
    unmarked = [
        item.nodeid
        for item in items
        if "local_served" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("local") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the local model but are not marked local: " + ", ".join(unmarked)
        )
    if without_torch.requested():
        local = [item.nodeid for item in items if item.get_closest_marker("local")]
        if local:
            raise pytest.UsageError(
                f"{without_torch.ENV} is set, and tests marked local need torch: "
                f'select -m "not local" ({len(local)} selected, such as {local[0]})'
            )


def pytest_report_header(config: pytest.Config) -> str | None:
    if without_torch.requested():
        return f"without torch ({without_torch.ENV}): {', '.join(without_torch.BLOCKED)} blocked"
    return None


@pytest.fixture
def stub(served: Served) -> pb_grpc.EmbeddingServiceAsyncStub:
    return served.stub


@dataclass(frozen=True)
class RichError:
    """A failed call's status, unpacked the way a careful caller would."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    violations: dict[str, str]
    violation_reasons: dict[str, str]
    # QuotaFailure: each subject and its description.
    quota_violations: dict[str, str] = field(default_factory=dict)


def unpack_status(status: status_pb2.Status) -> RichError:
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    quota = error_details_pb2.QuotaFailure()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
        elif detail.Is(quota.DESCRIPTOR):
            detail.Unpack(quota)
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    return RichError(
        code=code,
        message=status.message,
        reason=info.reason,
        metadata=dict(info.metadata),
        violations={v.field: v.description for v in bad.field_violations},
        violation_reasons={v.field: v.reason for v in bad.field_violations},
        quota_violations={v.subject: v.description for v in quota.violations},
    )


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0]
            return unpack_status(status)
    raise AssertionError(f"no status details on {error.code()}: {error.details()}")


async def embed_error(
    stub: pb_grpc.EmbeddingServiceAsyncStub, request: pb.EmbedRequest
) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(request, timeout=30)
    return rich_error(caught.value)
