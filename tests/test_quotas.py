"""Vendor quotas: at most N vendor requests (or tokens) in any window, per deployment and
per key, waited for within the caller's deadline, else QUOTA_EXHAUSTED naming the
deployment; shared by gateway processes through a real redis-server, and held by each
replica's own share when Redis goes away."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import structlog
import yaml
from conftest import rich_error
from fakes import FakeVendor, fake_vector, item_key, make_fake
from gateways import (
    KEY,
    deployment,
    free_port,
    key_file,
    openai_model,
    running,
    samples,
    value,
    wait_serving,
)
from redis_server import RedisServer
from vendor_world import retry_delay

from embedgate.server.app import build_quota_store
from embedgate.server.config import ConfigError
from embedgate.server.domain import estimate_tokens
from embedgate.server.edge.server import Gateway
from embedgate.server.metrics import Metrics
from embedgate.server.providers.registry import parse_config
from embedgate.server.quotas import Ask, LocalStore, Rate, SharedStore
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

DIMS = 1536


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# What the vendor sees lags what the gateway let through by the time a request takes to
# get there, which varies by some milliseconds (more on a busy machine): a request let
# through at the end of one window and one at the start of the next may arrive closer
# than a window apart. Windows at the vendor are checked a little shorter than the limit's.
JITTER_S = 0.1


def most_in_any_window(times: Sequence[float], period: float) -> int:
    """The most of ``times`` that fall in any window [t, t + period)."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - period:
            start += 1
        most = max(most, end - start + 1)
    return most


def ask(key: str = "k", limit: int = 5, period_ms: int = 1000, cost: int = 1) -> Ask:
    return Ask(key, limit, period_ms, cost)


# -- the window ------------------------------------------------------------------------


async def test_a_window_never_holds_more_than_its_limit_and_says_how_long_to_wait() -> None:
    """Takes at random moments over 20 s against 5 per second: no one-second window,
    wherever it starts, holds more than 5; nearly all the room is used; and a refusal's
    wait is exact: a millisecond before it the take is still refused, at it granted."""
    clock = Clock()
    store = LocalStore(clock=clock)
    rng = random.Random(7)  # noqa: S311 - arrival times, not secrets
    granted: list[float] = []
    start = clock.now
    while clock.now < start + 20:
        clock.now += rng.expovariate(25)  # 25 tries a second for 5 places
        taken = await store.take([ask()])
        if taken.granted:
            granted.append(clock.now)
            continue
        (wait,) = taken.waits
        assert wait > 0
        probe = LocalStore(clock=clock)
        probe._windows = {k: dict(v) for k, v in store._windows.items()}
        clock.now += wait - 0.001
        assert not (await probe.take([ask()])).granted
        clock.now += 0.001
        assert (await probe.take([ask()])).granted
        clock.now -= wait
    assert most_in_any_window(granted, 1.0) <= 5
    assert len(granted) >= 0.95 * 5 * 20


async def test_limits_are_taken_together_or_not_at_all() -> None:
    """A request needs room in every limit it is under: when one refuses, nothing is
    taken from the others."""
    store = LocalStore(clock=Clock())
    requests, tokens = ask("requests", limit=10), ask("tokens", limit=100, cost=60)
    assert (await store.take([requests, tokens])).granted
    refused = await store.take([requests, tokens])
    assert refused.waits[0] == 0
    assert refused.waits[1] > 0
    assert sum(store._windows["requests"].values()) == 1


async def test_settling_corrects_the_estimate() -> None:
    """A take settled up by what the vendor counted leaves less room; settled down,
    more."""
    store = LocalStore(clock=Clock())
    tokens = ask("tokens", limit=100, cost=40)
    taken = await store.take([tokens])
    await store.settle(tokens, taken.buckets[0], 30, local=True)  # the vendor said 70
    assert not (await store.take([tokens])).granted
    await store.settle(tokens, taken.buckets[0], -50, local=True)  # ... then 20
    assert (await store.take([tokens])).granted


def test_rates_and_token_estimates() -> None:
    """A rate is N per second, minute, hour or day, nothing vaguer; tokens are
    estimated from above before the vendor counts them."""
    assert Rate.parse("600/minute") == Rate(600, 60.0, "600/minute")
    assert Rate.parse(" 3 / day ").period_s == 86400
    for bad in ("600/min", "0/second", "-1/hour", "10", "1.5/second"):
        with pytest.raises(ValueError, match="not a rate"):
            Rate.parse(bad)
    # A third of the UTF-8 bytes, rounded up, plus one per input: above the fakes'
    # count of one token per character for Chinese, a little under it for English.
    assert estimate_tokens(["abcdef"]) == 3
    assert estimate_tokens(["北京"]) == 3
    assert estimate_tokens(["a", "b"]) == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rate_limit": "600/min"}, "models[0].rate_limit: Value error, '600/min' is not a rate"),
        ({"token_limit": 5}, "models[0].token_limit"),
        (
            {"api_key_envs": [{"env": "K1", "rate_limit": "fast"}], "api_key_file": None},
            "models[0].api_key_envs[0]",
        ),
    ],
)
def test_a_bad_limit_names_its_key(extra: dict[str, Any], message: str, tmp_path: Path) -> None:
    """A limit that is not a rate stops start-up naming its key, on a key of a pool too."""
    model = {
        "name": "m",
        "provider": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "vendor_model": "x",
        "api_key_file": str(key_file(tmp_path)),
        "dimensions": 8,
        **extra,
    }
    model = {k: v for k, v in model.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [model]})
    assert message.replace("Value error, ", "") in str(caught.value)


def test_local_share_is_a_share() -> None:
    """The share of each limit a replica keeps while Redis is away is at most all of it."""
    with pytest.raises(ConfigError, match=r"quotas\.local_share"):
        parse_config(
            {"quotas": {"local_share": 1.5}, "models": [{"name": "m", "provider": "local"}]}
        )


# -- through a gateway -------------------------------------------------------------------


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key=KEY) as vendor:
        yield vendor


@asynccontextmanager
async def serving(
    models: list[dict[str, Any]], quotas: dict[str, Any] | None = None
) -> AsyncIterator[tuple[pb_grpc.EmbeddingServiceAsyncStub, Gateway]]:
    async with (
        running(models, quotas=quotas) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield pb_grpc.EmbeddingServiceStub(channel), gateway


async def embed(
    stub: pb_grpc.EmbeddingServiceAsyncStub, *texts: str, deadline_s: float = 10
) -> pb.EmbedResponse:
    """One call, each of its vectors checked against the one the fake gives its text."""
    request = pb.EmbedRequest(model="m", inputs=[pb.Input(text=text) for text in texts])
    reply: pb.EmbedResponse = await stub.Embed(request, timeout=deadline_s)
    for text, embedding in zip(texts, reply.embeddings, strict=True):
        want = fake_vector(item_key(text=text), DIMS)
        np.testing.assert_allclose(np.asarray(embedding.values), want, atol=1e-6)
    return reply


async def refused(
    stub: pb_grpc.EmbeddingServiceAsyncStub, text: str, deadline_s: float = 2
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(stub, text, deadline_s=deadline_s)
    return caught.value


async def test_a_call_waits_for_room_within_its_deadline(fake: FakeVendor, tmp_path: Path) -> None:
    """2 requests a second: the third call waits until the first has left the window,
    then goes; none fails."""
    model = openai_model(fake, key_file(tmp_path), rate_limit="2/second")
    async with serving([model]) as (stub, gateway):
        for position in range(3):
            await embed(stub, f"wait-{position}", deadline_s=5)
        metrics = samples(gateway.metrics.exposition().decode())
    labels = {"model": "m", "deployment": "m", "limit": "requests"}
    assert value(metrics, "embedgate_quota_waits_total", **labels) == 1
    assert value(metrics, "embedgate_quota_refusals_total", **labels) == 0
    times = [r.at for r in fake.received]
    assert len(times) == 3
    assert times[2] - times[0] >= 0.98
    assert most_in_any_window(times, 1.0 - JITTER_S) <= 2


async def test_calls_waiting_for_room_are_served_in_the_order_they_came(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """Five requests a second, the window full, then eight calls a few milliseconds
    apart: they reach the vendor in the order they came, none passed over by a later
    one, and each as soon as there is room (all within about two seconds)."""
    model = openai_model(fake, key_file(tmp_path), rate_limit="5/second")
    async with serving([model]) as (stub, _):
        await asyncio.gather(*(embed(stub, f"fill-{n}") for n in range(5)))

        async def later(position: int) -> None:
            await asyncio.sleep(0.005 * position)
            await embed(stub, f"queued-{position}", deadline_s=5)

        started = time.monotonic()
        await asyncio.gather(*(later(position) for position in range(8)))
        took = time.monotonic() - started
    queued = [r.body["input"][0] for r in fake.received if r.body["input"][0][0] == "q"]
    assert queued == [f"queued-{position}" for position in range(8)]
    assert took < 2.5


async def test_no_room_within_the_deadline_fails_at_once_naming_the_deployment(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """1 request a minute: the second call cannot wait that long, so it fails at once
    with RESOURCE_EXHAUSTED, QUOTA_EXHAUSTED, RetryInfo and a QuotaFailure naming the
    deployment and its limit; the vendor never hears of it."""
    model = openai_model(fake, key_file(tmp_path), rate_limit="1/minute")
    async with serving([model]) as (stub, gateway):
        await embed(stub, "first")
        started = time.monotonic()
        error = await refused(stub, "second", deadline_s=5)
        assert time.monotonic() - started < 1
        metrics = samples(gateway.metrics.exposition().decode())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    rich = rich_error(error)
    assert rich.reason == "QUOTA_EXHAUSTED"
    assert rich.quota_violations == {"deployment:m": "1/minute vendor requests"}
    delay = retry_delay(error)
    assert delay is not None
    assert 55 < delay <= 60.6
    assert len(fake.received) == 1
    labels = {"model": "m", "deployment": "m", "limit": "requests"}
    assert value(metrics, "embedgate_quota_refusals_total", **labels) == 1


async def test_a_full_deployment_hands_its_requests_to_another(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """Two deployments of 1 request a minute each: two calls are served, one by each,
    without a failure counted against either breaker; the third fails at once with a
    QuotaFailure naming both."""
    keys = key_file(tmp_path)
    model = {
        "name": "m",
        "coalesce_wait_ms": 0,
        "deployments": [
            deployment(fake, keys, "a", rate_limit="1/minute"),
            deployment(fake, keys, "b", rate_limit="1/minute"),
        ],
    }
    async with serving([model]) as (stub, gateway):
        served = [(await embed(stub, f"call-{n}")) for n in range(2)]
        error = await refused(stub, "third")
        metrics = samples(gateway.metrics.exposition().decode())
    assert len(fake.received) == 2
    assert rich_error(error).reason == "QUOTA_EXHAUSTED"
    assert rich_error(error).quota_violations == {
        "deployment:a": "1/minute vendor requests",
        "deployment:b": "1/minute vendor requests",
    }
    assert len(served) == 2
    for name in ("a", "b"):
        assert value(metrics, "embedgate_deployment_breaker_state", model="m", deployment=name) == 0
        assert (
            value(
                metrics,
                "embedgate_deployment_requests_total",
                model="m",
                deployment=name,
                outcome="ok",
            )
            == 1
        )


async def test_a_pool_key_with_its_own_limit_sits_out_while_the_others_serve(
    tmp_path: Path,
) -> None:
    """Each key of a pool has 1 request a minute: the calls use each key once, then the
    next fails naming the key of the deployment that would be next."""
    files = []
    for position in range(2):
        path = tmp_path / f"key-{position}"
        path.write_text(f"pool-key-{position}\n")
        files.append({"file": str(path), "rate_limit": "1/minute"})
    async with make_fake("openai", api_key=None) as vendor:
        model = openai_model(vendor, key_file(tmp_path), api_key_file=None, api_key_files=files)
        model = {k: v for k, v in model.items() if v is not None}
        async with serving([model]) as (stub, _):
            await embed(stub, "one")
            await embed(stub, "two")
            error = await refused(stub, "three")
        sent = [r.headers["authorization"] for r in vendor.received]
    assert sorted(sent) == ["Bearer pool-key-0", "Bearer pool-key-1"]
    rich = rich_error(error)
    assert rich.reason == "QUOTA_EXHAUSTED"
    assert set(rich.quota_violations) <= {"deployment:m/key:0", "deployment:m/key:1"}
    assert set(rich.quota_violations.values()) == {"1/minute vendor requests"}


async def test_tokens_are_settled_with_the_vendors_count(fake: FakeVendor, tmp_path: Path) -> None:
    """50 tokens a minute; each 30-character text is estimated at 11 tokens, and the
    fake counts 30: once the first two are settled at 60, a third does not fit, though
    the estimates alone (33) would have let it through."""
    model = openai_model(fake, key_file(tmp_path), token_limit="50/minute")  # noqa: S106
    text = "x" * 30
    assert estimate_tokens([text]) == 11
    async with serving([model]) as (stub, _):
        reply = await embed(stub, text)
        assert reply.usage.total_tokens == 30
        await embed(stub, text)  # the cache is off: the vendor counts it again
        error = await refused(stub, text)
    assert rich_error(error).quota_violations == {"deployment:m": "50/minute tokens"}
    assert len(fake.received) == 2


async def test_batches_keep_filling_while_requests_wait_for_room(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """2 requests a second with coalescing on: calls arriving one by one while a request
    waits for room join the next batch instead of each queueing a request of its own."""
    model = openai_model(fake, key_file(tmp_path), rate_limit="2/second", coalesce_wait_ms=5)
    async with serving([model]) as (stub, _):
        await embed(stub, "warm-0")
        await embed(stub, "warm-1")  # the window is full for the next second

        async def later(position: int) -> pb.EmbedResponse:
            await asyncio.sleep(0.04 * position)
            return await embed(stub, f"late-{position}", deadline_s=10)

        await asyncio.gather(*(later(position) for position in range(12)))
    sizes = [len(r.body["input"]) for r in fake.received]
    assert sum(sizes) == 14
    assert len(sizes) <= 5, sizes  # one request per call would be 14
    assert most_in_any_window([r.at for r in fake.received], 1.0 - JITTER_S) <= 2


# -- shared through Redis ----------------------------------------------------------------


async def test_replicas_take_from_one_window_in_redis(redis_server: RedisServer) -> None:
    """Two replicas' stores on one Redis: what one took, the other cannot; a settlement
    made through one is seen by the other."""
    one, two = SharedStore(redis_server.url), SharedStore(redis_server.url)
    try:
        requests = ask("embedgate:quota:{t}:requests", limit=3, period_ms=60_000)
        assert (await one.take([requests])).granted
        assert (await two.take([requests])).granted
        assert (await one.take([requests])).granted
        (wait,) = (await two.take([requests])).waits
        # Up to a bucket (a hundredth of the window) beyond it: the oldest counts whole.
        assert 59 < wait <= 60.6
        tokens = ask("embedgate:quota:{t}:tokens", limit=100, period_ms=60_000, cost=80)
        taken = await one.take([tokens])
        assert not (await two.take([tokens])).granted
        await one.settle(tokens, taken.buckets[0], -70, local=taken.local)
        assert (await two.take([tokens])).granted
        assert not one.local
        assert not two.local
    finally:
        await one.close()
        await two.close()


async def test_an_unreachable_redis_leaves_each_replica_its_share(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listens at the Redis address: takes are served locally at half of each
    limit, the outage is said once (no password), and nothing fails."""
    changes: list[bool] = []
    url = f"redis://:secret-pass@127.0.0.1:{free_port()}/0"
    store = SharedStore(url, local_share=0.5, timeout_s=0.2, on_local=changes.append)
    structlog.configure(processors=[structlog.processors.JSONRenderer()])
    try:
        requests = ask("embedgate:quota:{t}:requests", limit=4, period_ms=60_000)
        answers = [(await store.take([requests])).granted for _ in range(4)]
    finally:
        await store.close()
        structlog.reset_defaults()
    assert answers == [True, True, False, False]
    assert changes == [True]
    logged = capsys.readouterr().out
    assert logged.count("quota_store_unreachable") == 1
    assert "secret-pass" not in logged


def test_the_quotas_use_the_caches_redis_when_they_name_none(tmp_path: Path) -> None:
    """Without quotas.redis_url the quotas share the cache's Redis; with neither, each
    replica counts alone; with no limit anywhere, there is nothing to count."""
    model = {
        "name": "m",
        "provider": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "vendor_model": "text-embedding-3-small",
        "api_key_file": str(key_file(tmp_path)),
        "rate_limit": "5/second",
    }
    cache = {"redis_url": "redis://127.0.0.1:1/0"}
    shared = build_quota_store(parse_config({"cache": cache, "models": [model]}), Metrics())
    assert isinstance(shared, SharedStore)
    alone = build_quota_store(parse_config({"models": [model]}), Metrics())
    assert isinstance(alone, LocalStore)
    unlimited = {k: v for k, v in model.items() if k != "rate_limit"}
    assert (
        build_quota_store(parse_config({"cache": cache, "models": [unlimited]}), Metrics()) is None
    )


def serve_config(fake: FakeVendor, keys: Path, redis_url: str, **model: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "shutdown_grace_s": 1},
        "cache": {"enabled": False},
        "quotas": {"redis_url": redis_url},
        "models": [openai_model(fake, keys, **model)],
    }


@asynccontextmanager
async def gateway_process(config: dict[str, Any], tmp_path: Path, name: str) -> AsyncIterator[str]:
    """``embedgate serve`` in its own process with ``config``; yields its address."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / f"{name}.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedgate.client.cli",
            "serve",
            "--config",
            str(path),
            "--port",
            str(port),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=log,
        )
        try:
            await wait_serving(f"127.0.0.1:{port}", 60)
            yield f"127.0.0.1:{port}"
        finally:
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 20)


async def hammer(target: str, prefix: str, seconds: float, callers: int = 4) -> int:
    """Calls from ``callers`` concurrent callers for ``seconds``; the number that
    failed."""
    failures = 0
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def caller(who: int) -> None:
            nonlocal failures
            sent = 0
            while time.monotonic() < stop and sent < 1000:
                sent += 1
                try:
                    await embed(stub, f"{prefix}-{who}-{sent}", deadline_s=3)
                except grpc.aio.AioRpcError:
                    failures += 1

        await asyncio.gather(*(caller(who) for who in range(callers)))
    return failures


async def test_two_gateway_processes_hold_one_rate_limit_through_redis(
    fake: FakeVendor, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two `embedgate serve` processes with 10 requests a second between them, each
    pressed by callers for 3 s: the vendor never sees more than 10 in any second (within
    one of slack), and the limit is used, not starved."""
    config = serve_config(fake, key_file(tmp_path), redis_server.url, rate_limit="10/second")
    async with (
        gateway_process(config, tmp_path, "one") as one,
        gateway_process(config, tmp_path, "two") as two,
    ):
        fake.reset()
        started = time.monotonic()
        failures = await asyncio.gather(hammer(one, "one", 3), hammer(two, "two", 3))
        elapsed = time.monotonic() - started
    times = [r.at for r in fake.received]
    assert list(failures) == [0, 0]
    assert most_in_any_window(times, 1.0 - JITTER_S) <= 11
    assert len(times) >= 0.6 * 10 * elapsed
    senders = {r.body["input"][0].split("-")[0] for r in fake.received}
    assert senders == {"one", "two"}


async def test_calls_go_on_at_the_local_share_when_redis_dies(
    fake: FakeVendor, redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis is killed while callers press a gateway with 10 requests a second and a
    local share of a half: no call fails, the outage is logged once and metered, and
    from then on the vendor sees at most 5 a second from it."""
    model = openai_model(fake, key_file(tmp_path), rate_limit="10/second")
    quotas = {"redis_url": redis_server.url, "local_share": 0.5, "redis_timeout_s": 0.2}
    async with serving([model], quotas=quotas) as (_, gateway):
        target = f"127.0.0.1:{gateway.port}"
        before = await hammer(target, "before", 1.5)
        redis_server.stop()
        killed = time.monotonic()
        after = await hammer(target, "after", 2.5)
        metrics = samples(gateway.metrics.exposition().decode())
    assert (before, after) == (0, 0)
    late = [r.at for r in fake.received if r.at > killed + 0.05]
    assert len(late) >= 5
    assert most_in_any_window(late, 1.0 - JITTER_S) <= 6
    assert value(metrics, "embedgate_quota_local") == 1
    assert capsys.readouterr().out.count("quota_store_unreachable") == 1
