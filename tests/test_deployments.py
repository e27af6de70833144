"""A model served by several deployments of one vector space, through a real gateway in
front of loopback fakes: a deployment that is down costs callers nothing and, once its
breaker opens, sees only probes; every deployment down fails at once with RetryInfo;
priorities, weights, refused keys and Retry-After; deployments that disagree stop
start-up."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import structlog
import yaml
from conftest import ScriptedProvider, rich_error
from fakes import FakeVendor, Fault, fake_vector, item_key, make_fake
from gateways import (
    KEY,
    deployment,
    free_port,
    health_status,
    key_file,
    running,
    samples,
    value,
)
from vendor_world import retry_delay

import embedgate.client as eg
from embedgate.server.app import build_gateway, check
from embedgate.server.config import ConfigError
from embedgate.server.domain import (
    Dimensions,
    EmbedOptions,
    ImageInput,
    Modality,
    ModelInfo,
    TextInput,
)
from embedgate.server.edge.images import sniff_image
from embedgate.server.health import Health
from embedgate.server.providers.registry import parse_config
from embedgate.server.routing.balance import Member
from embedgate.server.routing.breaker import Breaker, BreakerPolicy
from embedgate.server.routing.deployments import Deployment, DeploymentSet, probe_inputs
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

DIMS = 1536  # text-embedding-3-small's, which both fakes give


def deployed(*deployments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "m",
        "space": "te3-small",
        "coalesce_wait_ms": 0,
        "deployments": list(deployments),
        **extra,
    }


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[FakeVendor, FakeVendor]]:
    async with make_fake("openai", api_key=KEY) as a, make_fake("openai", api_key=KEY) as b:
        yield a, b


@asynccontextmanager
async def serving(
    model: dict[str, Any],
) -> AsyncIterator[tuple[pb_grpc.EmbeddingServiceAsyncStub, grpc.aio.Channel]]:
    """A gateway serving ``model``, and a stub and channel to it."""
    async with (
        running([model]) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield pb_grpc.EmbeddingServiceStub(channel), channel


async def embed(stub: pb_grpc.EmbeddingServiceAsyncStub, text: str) -> pb.EmbedResponse:
    request = pb.EmbedRequest(model="m", inputs=[pb.Input(text=text)])
    reply: pb.EmbedResponse = await stub.Embed(request, timeout=10)
    return reply


def vector_of(reply: pb.EmbedResponse) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.asarray(reply.embeddings[0].values, dtype=np.float32)


async def test_a_deployment_that_is_down_costs_callers_nothing(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """One of two deployments answers 503 to everything: no call fails, each gets its
    own vector, and once the dead one's breaker is open it sees no more requests."""
    good, dead = pair
    dead.always(Fault.status(503))
    keys = key_file(tmp_path)
    model = deployed(
        deployment(good, keys, "good"),
        deployment(dead, keys, "dead"),
        breaker={"failures": 5, "open_s": 600},
    )
    async with serving(model) as (stub, channel):
        opened_after = 0
        for round_ in range(6):
            texts = [f"text {round_}-{i}" for i in range(50)]
            replies = await asyncio.gather(*(embed(stub, text) for text in texts))
            for text, reply in zip(texts, replies, strict=True):
                np.testing.assert_allclose(
                    vector_of(reply), fake_vector(item_key(text=text), DIMS), atol=1e-6
                )
            if round_ == 0:
                # The failures that opened its breaker, and any sent while they were
                # on their way back.
                opened_after = len(dead.received)
                assert 5 <= opened_after <= 25
        assert len(dead.received) == opened_after  # nothing more, not even a probe
        assert len(good.received) == 300
        assert await health_status(channel, "m") == "SERVING"


async def test_connection_refused_and_hanging_deployments_are_left_too(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """Nothing listening, or a vendor that never answers (after the attempt's limit):
    the request goes to the deployment that works, and no call fails."""
    good, hanging = pair
    hanging.always(Fault.hang())
    keys = key_file(tmp_path)
    refused = f"http://127.0.0.1:{free_port()}/v1"
    model = deployed(
        deployment(good, keys, "good"),
        deployment(refused, keys, "refused"),
        deployment(hanging, keys, "hanging", timeout_s=0.2),
        breaker={"failures": 2, "open_s": 600},
    )
    async with serving(model) as (stub, _channel):
        for i in range(40):
            await embed(stub, f"t{i}")
        assert len(good.received) == 40
        assert len(hanging.received) <= 2


async def test_recovery_closes_the_breaker(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """After open_s, one probe goes to the dead deployment; when it answers, the
    deployment takes its share again."""
    good, flaky = pair
    flaky.always(Fault.status(500))
    keys = key_file(tmp_path)
    model = deployed(
        deployment(good, keys, "good"),
        deployment(flaky, keys, "flaky"),
        breaker={"failures": 1, "open_s": 0.3},
    )
    async with serving(model) as (stub, _channel):
        for i in range(10):
            await embed(stub, f"a{i}")
        assert len(flaky.received) == 1
        flaky.always(None)
        await asyncio.sleep(0.35)
        for i in range(60):
            await embed(stub, f"b{i}")
        assert len(flaky.received) > 10  # probed, closed, and sharing again


async def test_every_deployment_down_fails_at_once_with_retry_info(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """With every breaker open a call fails at once: UNAVAILABLE, NO_DEPLOYMENT_AVAILABLE,
    RetryInfo for the first breaker's next probe; the model is NOT_SERVING."""
    one, two = pair
    one.always(Fault.status(503))
    two.always(Fault.status(503))
    keys = key_file(tmp_path)
    model = deployed(
        deployment(one, keys, "one"),
        deployment(two, keys, "two"),
        breaker={"failures": 1, "open_s": 30},
    )
    async with serving(model) as (stub, channel):
        with pytest.raises(grpc.aio.AioRpcError) as first:
            await embed(stub, "x")
        # It tried both (the last one in service again): the caller hears the vendor.
        assert rich_error(first.value).reason == "VENDOR_UNAVAILABLE"
        # The last deployment in service opens only once its window of 20 is full.
        reasons = []
        for i in range(10):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await embed(stub, f"x{i}")
            reasons.append(rich_error(failed.value).reason)
        assert reasons[-1] == "NO_DEPLOYMENT_AVAILABLE"
        sent = len(one.received) + len(two.received)
        assert sent <= 25
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embed(stub, "y")
        took = time.perf_counter() - started
        error = rich_error(caught.value)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error.reason == "NO_DEPLOYMENT_AVAILABLE"
        delay = retry_delay(caught.value)
        assert delay is not None
        assert 25 < delay <= 30
        assert took < 0.5
        assert len(one.received) + len(two.received) == sent
        assert await health_status(channel, "m") == "NOT_SERVING"


async def test_priority_one_serves_only_when_priority_zero_cannot(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """A priority-1 deployment gets nothing while a priority-0 one is usable."""
    main, spare = pair
    keys = key_file(tmp_path)
    model = deployed(
        deployment(main, keys, "main"),
        deployment(spare, keys, "spare", priority=1),
        breaker={"failures": 1, "open_s": 600},
    )
    async with serving(model) as (stub, _channel):
        for i in range(20):
            await embed(stub, f"p{i}")
        assert (len(main.received), len(spare.received)) == (20, 0)
        main.always(Fault.status(503))
        for i in range(20):
            await embed(stub, f"q{i}")
        assert len(spare.received) == 20


async def test_weights_share_the_requests(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """Weights 3:1 give the first deployment about three quarters of the requests."""
    heavy, light = pair
    keys = key_file(tmp_path)
    model = deployed(deployment(heavy, keys, "heavy", weight=3), deployment(light, keys, "light"))
    async with serving(model) as (stub, _channel):
        for i in range(400):
            await embed(stub, f"w{i}")
    share = len(heavy.received) / 400
    assert 0.68 < share < 0.82


async def test_a_retry_after_is_waited_out_not_counted_as_a_failure(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """A 429 with Retry-After makes that deployment wait that long, without a mark on its
    breaker: the other serves meanwhile, and it takes requests again after the wait."""
    good, busy = pair
    keys = key_file(tmp_path)
    model = deployed(
        deployment(good, keys, "good"),
        deployment(busy, keys, "busy"),
        breaker={"failures": 1, "open_s": 600},
    )
    async with serving(model) as (stub, _channel):
        busy.always(Fault.status(429, retry_after="0.5"))
        for i in range(30):
            await embed(stub, f"r{i}")
        assert len(busy.received) == 1
        busy.always(None)
        await asyncio.sleep(0.6)
        for i in range(40):
            await embed(stub, f"s{i}")
        assert len(busy.received) > 5  # with failures: 1, a counted 429 would have opened it


async def test_a_refused_key_takes_the_deployment_out_and_the_call_goes_on(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """A 401 takes that deployment out of service at once (whatever its breaker's count)
    and the call that met it is served by another deployment."""
    refused, good = pair
    refused.api_key = "rotated-by-the-vendor"
    keys = key_file(tmp_path)
    model = deployed(
        deployment(refused, keys, "refused"),
        deployment(good, keys, "good"),
        breaker={"failures": 5, "open_s": 600},
    )
    async with serving(model) as (stub, _channel):
        for i in range(30):
            await embed(stub, f"k{i}")
        assert len(refused.received) == 1
        assert len(good.received) == 30


def test_deployments_that_disagree_stop_start_up(tmp_path: Path) -> None:
    """Deployments of one model must give the same vectors: a different size stops
    start-up naming the deployment and the key."""
    keys = key_file(tmp_path)
    config = parse_config(
        {
            "models": [
                deployed(
                    deployment("http://127.0.0.1:9/v1", keys, "a"),
                    deployment("http://127.0.0.1:9/v1", keys, "b", dimensions=512),
                )
            ]
        }
    )
    with pytest.raises(ConfigError) as caught:
        build_gateway(config)
    message = str(caught.value)
    assert "models[0].deployments[1].dimensions" in message
    assert "'b'" in message
    assert "'a'" in message


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"name": "m", "provider": "openai", "deployments": [{"name": "a"}]},
            "models[0]: a model with deployments names no provider",
        ),
        (
            {"name": "m", "deployments": [{"name": "a", "provider": "nope"}]},
            "models[0].deployments[0].provider: unknown provider 'nope'",
        ),
        (
            {"name": "m", "deployments": [{"name": "a", "provider": "scnet"}]},
            "models[0].deployments[0]: api_key_env or api_key_file is required",
        ),
        (
            {
                "name": "m",
                "deployments": [
                    {"name": "a", "provider": "openai", "vendor_model": "text-embedding-3-small"},
                    {"name": "a", "provider": "openai", "vendor_model": "text-embedding-3-small"},
                ],
            },
            "deployment names must be unique: a",
        ),
        (
            {
                "name": "m",
                "deployments": [
                    {
                        "name": "a",
                        "provider": "openai",
                        "vendor_model": "text-embedding-3-small",
                        "coalesce_wait_ms": 2,
                    }
                ],
            },
            "deployments[0].coalesce_wait_ms: batching belongs to the model",
        ),
        ({"name": "m", "deployments": []}, "models[0].deployments: List should have at least 1"),
        (
            {"name": "m", "breaker": {"failures": 0}, "deployments": [{"name": "a"}]},
            "models[0].breaker.failures",
        ),
    ],
)
def test_a_bad_deployments_entry_names_its_key(model: dict[str, Any], message: str) -> None:
    """Each mistake in a model's deployments is reported with its key path."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [model]})
    assert message in str(caught.value)


def test_a_model_without_deployments_is_todays_model() -> None:
    """An entry with a provider is one endpoint as before; deployments are an option."""
    config = parse_config(
        {"models": [{"name": "m", "provider": "openai", "vendor_model": "text-embedding-3-small"}]}
    )
    assert type(config.models[0]).__name__ == "OpenAISettings"


async def test_list_models_shows_the_space_and_each_deployment_state(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """ListModels gives a deployed model's space and its deployments, each in service or
    out of it as its breaker says; a model with one endpoint lists none."""
    good, dead = pair
    dead.always(Fault.status(503))
    keys = key_file(tmp_path)
    model = deployed(
        deployment(good, keys, "good"),
        deployment(dead, keys, "dead", provider="openai"),
        breaker={"failures": 1, "open_s": 600},
    )
    single = {**deployment(good, keys, "single"), "coalesce_wait_ms": 0}
    async with (
        running([model, single]) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for i in range(10):
            await embed(stub, f"l{i}")
        listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    deployed_model, one = listed["m"], listed["single"]
    assert deployed_model.space == "te3-small"
    states = {d.name: (d.provider, d.state) for d in deployed_model.deployments}
    assert states == {
        "good": ("openai", pb.DEPLOYMENT_STATE_IN_SERVICE),
        "dead": ("openai", pb.DEPLOYMENT_STATE_OUT_OF_SERVICE),
    }
    assert (one.space, list(one.deployments)) == ("", [])


async def test_the_python_client_lists_deployments(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """The typed client's ModelInfo carries the space and each deployment's state."""
    good, other = pair
    keys = key_file(tmp_path)
    model = deployed(deployment(good, keys, "good"), deployment(other, keys, "other"))
    async with (
        running([model]) as gateway,
        eg.AsyncClient(f"127.0.0.1:{gateway.port}") as client,
    ):
        (info,) = await client.list_models()
    assert info.space == "te3-small"
    assert info.deployments == (
        eg.Deployment("good", "openai", "in_service"),
        eg.Deployment("other", "openai", "in_service"),
    )


async def test_breakers_and_deployments_are_metered_and_logged(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """Per deployment: its breaker's state and changes, its requests by outcome; the
    access line names the deployments that served each RPC."""
    good, dead = pair
    dead.always(Fault.status(503))
    keys = key_file(tmp_path)
    model = deployed(
        deployment(good, keys, "good"),
        deployment(dead, keys, "dead"),
        breaker={"failures": 2, "open_s": 600},
    )
    async with (
        running([model]) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with structlog.testing.capture_logs() as logs:
            for i in range(20):
                await embed(stub, f"m{i}")
        found = samples(gateway.metrics.exposition().decode())
    assert value(found, "embedgate_deployment_breaker_state", model="m", deployment="dead") == 2
    assert value(found, "embedgate_deployment_breaker_state", model="m", deployment="good") == 0
    opened = value(
        found,
        "embedgate_deployment_breaker_transitions_total",
        model="m",
        deployment="dead",
        state="open",
    )
    assert opened == 1
    ok = value(
        found, "embedgate_deployment_requests_total", model="m", deployment="good", outcome="ok"
    )
    failed = value(
        found,
        "embedgate_deployment_requests_total",
        model="m",
        deployment="dead",
        outcome="vendor_unavailable",
    )
    assert (ok, failed) == (20, 2)
    lines = [line for line in logs if line["event"] == "rpc_finished"]
    assert len(lines) == 20
    assert {line["deployments"] for line in lines} == {"good"}


def space_config(tmp_path: Path, a: FakeVendor, b: FakeVendor) -> dict[str, Any]:
    keys = key_file(tmp_path)
    model = deployed(deployment(a, keys, "a"), deployment(b, keys, "b"), space_check=True)
    return {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 1},
        "cache": {"enabled": False},
        "models": [model],
    }


async def check_command(config: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    """``embedgate check --config FILE`` as a process: its exit code and its output."""
    file = tmp_path / "embedgate.yaml"
    file.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from embedgate.client.cli import main; sys.exit(main(sys.argv[1:]))",
        "check",
        "--config",
        str(file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def test_the_space_check_passes_for_deployments_of_one_space(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """space_check: true embeds the probes through each deployment at start-up; the
    same vectors pass, and `embedgate check` says so without serving."""
    a, b = pair
    config = space_config(tmp_path, a, b)
    gateway = build_gateway(parse_config(config))
    with structlog.testing.capture_logs() as logs:
        await gateway.start()
    await gateway.stop(grace=0)
    assert any(line["event"] == "space_check_passed" for line in logs)
    assert len(a.received) == len(b.received) == 4  # one request per probe text
    assert await check(parse_config(config)) == ["m: openai (vector space checked)"]
    code, out = await check_command(config, tmp_path)
    assert code == 0, out
    assert "configuration OK: 1 model(s)" in out
    assert "m: openai (vector space checked)" in out


async def test_the_space_check_stops_start_up_for_another_space(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """A deployment whose vectors differ stops start-up naming both deployments, the
    probe and the cosine; `embedgate check` exits 2 with the same words."""
    a, b = pair
    b.space_salt = "another model:"
    config = space_config(tmp_path, a, b)
    gateway = build_gateway(parse_config(config))
    with pytest.raises(ConfigError) as caught:
        await gateway.start()
    await gateway.stop(grace=0)
    message = str(caught.value)
    assert "deployments 'a' and 'b' give different vectors for probe 'The cat sat" in message
    assert "below space_check_min_cosine 0.99" in message
    with pytest.raises(ConfigError, match="give different vectors"):
        await check(parse_config(config))
    code, out = await check_command(config, tmp_path)
    assert code == 2
    assert "deployments 'a' and 'b' give different vectors" in out


async def test_calls_wait_out_a_retry_after_on_the_last_deployment(
    pair: tuple[FakeVendor, FakeVendor], tmp_path: Path
) -> None:
    """With the other deployment's breaker open, a 429 with Retry-After on the last one
    makes every call wait it out (within its deadline) rather than fail: a wait is not
    an outage."""
    good, dead = pair
    dead.always(Fault.status(503))
    keys = key_file(tmp_path)
    model = deployed(
        deployment(good, keys, "good"),
        deployment(dead, keys, "dead"),
        breaker={"failures": 1, "open_s": 600},
    )
    async with serving(model) as (stub, _):
        for i in range(10):
            await embed(stub, f"warm {i}")  # the dead one's breaker opens
        good.plan(Fault.status(429, retry_after="0.3"))
        first = asyncio.ensure_future(embed(stub, "first"))
        await asyncio.sleep(0.1)  # the 429 has come back: the good one is waiting
        later = [embed(stub, f"later {i}") for i in range(5)]
        replies = await asyncio.gather(first, *later)
    assert len(replies) == 6


def test_the_probes_follow_the_models_modalities() -> None:
    """Text probes for a model that takes text; a real PNG image too for one that takes
    images (so a multimodal space is checked on images as well)."""
    text_only = ModelInfo("t", "openai", frozenset({Modality.TEXT}), 8, Dimensions(4, 4, 4))
    both = dataclasses.replace(text_only, modalities=frozenset({Modality.TEXT, Modality.IMAGE}))
    assert all(isinstance(probe, TextInput) for probe in probe_inputs(text_only))
    images = [probe for probe in probe_inputs(both) if isinstance(probe, ImageInput)]
    assert len(images) == 1
    assert sniff_image(images[0].image.data or b"") == "image/png"


async def test_a_wait_that_ends_while_the_balancer_looks_is_still_waited_for() -> None:
    """The last usable deployment's Retry-After ends just as a call looks for one, and
    the other's breaker is open: the call waits the last microsecond and is served, never
    told NO_DEPLOYMENT_AVAILABLE because the clock moved between two readings."""
    flaky, down = ScriptedProvider("m", dims=8), ScriptedProvider("m", dims=8)
    ends = 500.0
    readings: list[float] = []

    def clock() -> float:
        # Just before the wait ends at the first reading, at its end from then on.
        readings.append(ends - 1e-6 if not readings else ends)
        return readings[-1]

    members = [
        Member("flaky", Breaker(BreakerPolicy(), clock=lambda: ends), waiting_until=ends),
        Member("down", Breaker(BreakerPolicy(), clock=lambda: ends)),
    ]
    members[1].breaker.trip()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    models = DeploymentSet(
        flaky.info,
        [Deployment(flaky, members[0]), Deployment(down, members[1])],
        health=Health().model("m"),
        clock=clock,
        sleep=sleep,
    )
    batch = await models.embed([TextInput("x")], EmbedOptions())
    assert batch.deployment == "flaky"
    assert slept == [pytest.approx(1e-6)]
    assert (flaky.calls, down.calls) == ([1], [])
