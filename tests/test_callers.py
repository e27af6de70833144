"""Each caller identified, its use counted, and its own limits held: by token name with
auth, by the name it gives without, across every door and across replicas sharing a
Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import structlog
import yaml
from fakes import FakeVendor, make_fake
from gateways import key_file, openai_model, running, samples, value
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import generate_latest
from redis_server import RedisServer

from embedgate.client import cli
from embedgate.server.config import CallerConfig, ConfigError
from embedgate.server.domain import TextInput
from embedgate.server.edge.access import Access
from embedgate.server.edge.callers import Callers
from embedgate.server.edge.server import Gateway
from embedgate.server.errors import CallerQuotaExceededError
from embedgate.server.metrics import Metrics
from embedgate.server.providers.registry import parse_config
from embedgate.server.quotas import LocalStore
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

TOKEN_A = "caller-token-a-canary-9d1e"  # noqa: S105
TOKEN_B = "caller-token-b-canary-3f70"  # noqa: S105


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key="vendor-key-for-tests") as vendor:
        yield vendor


def texts(*values: str, model: str = "m") -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, inputs=[pb.Input(text=v) for v in values])


async def embed(gateway: Gateway, request: pb.EmbedRequest, **metadata: str) -> pb.EmbedResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        response: pb.EmbedResponse = await stub.Embed(
            request, metadata=tuple((k.replace("_", "-"), v) for k, v in metadata.items())
        )
        return response


def counted(gateway: Gateway, caller: str, model: str = "m") -> dict[str, float]:
    found = samples(generate_latest(gateway.metrics.registry).decode())
    return {
        what: value(found, f"embedgate_caller_{what}_total", caller=caller, model=model)
        for what in ("rpcs", "inputs", "cached_inputs", "tokens", "vendor_requests", "cost")
    }


async def test_callers_by_the_name_they_give_are_counted_apart(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """Without auth, a call's caller is the name it gives (x-embedgate-caller): each
    configured name is counted apart (calls, inputs, cache hits, tokens, vendor
    requests, cost at the deployment's price); no name is anonymous; a name not
    configured is counted as (other) but named in the access line."""
    model = openai_model(fake, key_file(tmp_path), price_per_million_tokens=2.0)
    callers = {"names": [{"name": "search"}, {"name": "ingest"}]}
    async with running([model], cache=True, callers=callers) as gateway:
        with structlog.testing.capture_logs() as logs:
            await embed(gateway, texts("apples", "pears"), x_embedgate_caller="search")
            await embed(gateway, texts("plums"), x_embedgate_caller="ingest")
            # "apples" is a cache hit now: an input, no tokens, no vendor request.
            await embed(gateway, texts("apples", "figs"), x_embedgate_caller="ingest")
            await embed(gateway, texts("kiwis"))
            await embed(gateway, texts("limes"), x_embedgate_caller="someone-else")
        search, ingest = counted(gateway, "search"), counted(gateway, "ingest")
        anonymous, other = counted(gateway, "anonymous"), counted(gateway, "(other)")
        found = samples(generate_latest(gateway.metrics.registry).decode())
    # The fake counts a token per character.
    assert search == {
        "rpcs": 1,
        "inputs": 2,
        "cached_inputs": 0,
        "tokens": 11,
        "vendor_requests": 1,
        "cost": pytest.approx(11 * 2.0 / 1e6),
    }
    assert ingest == {
        "rpcs": 2,
        "inputs": 3,
        "cached_inputs": 1,
        "tokens": 9,
        "vendor_requests": 2,
        "cost": pytest.approx(9 * 2.0 / 1e6),
    }
    assert (anonymous["rpcs"], anonymous["tokens"]) == (1, 5)
    assert (other["rpcs"], other["tokens"]) == (1, 5)
    sent = value(found, "embedgate_deployment_tokens_total", model="m", deployment="m")
    assert sent == 11 + 9 + 5 + 5
    lines = [e for e in logs if e["event"] == "rpc_finished"]
    assert [(e["caller"], e["tokens"]) for e in lines] == [
        ("search", 11),
        ("ingest", 5),
        ("ingest", 4),
        ("anonymous", 5),
        ("someone-else", 5),
    ]


async def test_with_auth_the_caller_is_its_token(fake: FakeVendor, tmp_path: Path) -> None:
    """With auth, the caller is its token's name, whatever name it gives."""
    (tmp_path / "a").write_text(TOKEN_A)
    auth = {"tokens": [{"name": "team-a", "token_file": str(tmp_path / "a")}]}
    async with running([openai_model(fake, key_file(tmp_path))], http_port=0, auth=auth) as gateway:
        await embed(
            gateway,
            texts("apples"),
            authorization=f"Bearer {TOKEN_A}",
            x_embedgate_caller="someone-else",
        )
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"http://127.0.0.1:{gateway.http_port}/v1/embeddings",
                json={"model": "m", "input": "pears", "encoding_format": "float"},
                headers={"authorization": f"Bearer {TOKEN_A}"},
            )
        assert reply.status_code == 200
        assert counted(gateway, "team-a")["rpcs"] == 2
        assert counted(gateway, "(other)")["rpcs"] == 0


def quota_failure(error: grpc.aio.AioRpcError) -> tuple[str, list[tuple[str, str]], float]:
    status = rpc_status.from_call(error)
    assert status is not None
    reason, violations, delay = "", [], 0.0
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message: Any = kind()
                detail.Unpack(message)
                if isinstance(message, error_details_pb2.ErrorInfo):
                    reason = message.reason
                elif isinstance(message, error_details_pb2.QuotaFailure):
                    violations = [(v.subject, v.description) for v in message.violations]
                else:
                    delay = message.retry_delay.ToTimedelta().total_seconds()
    return reason, violations, delay


async def test_a_caller_over_its_limits_is_refused_and_another_is_not(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """A token's rate_limit, input_limit and token_limit each refuse its next call at
    once, before the vendor: RESOURCE_EXHAUSTED, CALLER_QUOTA_EXCEEDED, a QuotaFailure
    naming the caller and the limit, a RetryInfo. Another token is not refused; the
    OpenAI door answers 429 with Retry-After."""
    (tmp_path / "a").write_text(TOKEN_A)
    (tmp_path / "b").write_text(TOKEN_B)
    auth = {
        "tokens": [
            {"name": "a", "token_file": str(tmp_path / "a"), "rate_limit": "2/hour"},
            {"name": "b", "token_file": str(tmp_path / "b"), "input_limit": "3/hour"},
        ]
    }
    async with running([openai_model(fake, key_file(tmp_path))], http_port=0, auth=auth) as gateway:
        a = {"authorization": f"Bearer {TOKEN_A}"}
        b = {"authorization": f"Bearer {TOKEN_B}"}
        await embed(gateway, texts("one"), **a)
        await embed(gateway, texts("two", "three"), **a)
        with pytest.raises(grpc.aio.AioRpcError) as over_rate:
            await embed(gateway, texts("four"), **a)
        await embed(gateway, texts("one", "two"), **b)
        with pytest.raises(grpc.aio.AioRpcError) as over_inputs:
            await embed(gateway, texts("three", "four"), **b)
        await embed(gateway, texts("five"), **b)  # fits the third input
        async with httpx.AsyncClient() as http:
            refused = await http.post(
                f"http://127.0.0.1:{gateway.http_port}/v1/embeddings",
                json={"model": "m", "input": "six"},
                headers=a,
            )
        found = samples(generate_latest(gateway.metrics.registry).decode())
    assert over_rate.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, violations, delay = quota_failure(over_rate.value)
    assert reason == "CALLER_QUOTA_EXCEEDED"
    assert violations == [("caller:a", "rate_limit: 2/hour calls")]
    assert 3000 < delay <= 3600 + 36 + 1  # the window counts in hundredths of its length
    reason, violations, _ = quota_failure(over_inputs.value)
    assert violations == [("caller:b", "input_limit: 3/hour inputs")]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "CALLER_QUOTA_EXCEEDED"
    assert int(refused.headers["retry-after"]) > 3000
    assert len(fake.received) == 4  # the refused calls never reached the vendor
    assert (
        value(found, "embedgate_caller_quota_refusals_total", caller="a", limit="rate_limit") == 2
    )
    assert (
        value(found, "embedgate_caller_quota_refusals_total", caller="b", limit="input_limit") == 1
    )


async def test_a_token_limit_counts_what_was_embedded(fake: FakeVendor, tmp_path: Path) -> None:
    """token_limit counts the tokens the model counted (the estimate taken up front is
    settled): cache hits cost none, and a caller whose tokens are spent is refused."""
    callers = {"names": [{"name": "ingest", "token_limit": "12/hour"}]}
    model = openai_model(fake, key_file(tmp_path))
    async with running([model], cache=True, callers=callers) as gateway:
        who = {"x_embedgate_caller": "ingest"}
        await embed(gateway, texts("apples"), **who)  # 6 tokens
        await embed(gateway, texts("apples"), **who)  # a cache hit: none
        await embed(gateway, texts("pear"), **who)  # 4: 10 of 12
        with pytest.raises(grpc.aio.AioRpcError) as spent:
            await embed(gateway, texts("plums"), **who)  # 5 more would be 15
        await embed(gateway, texts("plums"))  # anonymous has no limit
    _, violations, _ = quota_failure(spent.value)
    assert violations == [("caller:ingest", "token_limit: 12/hour tokens")]


async def test_two_replicas_hold_one_callers_limit_through_redis(
    fake: FakeVendor, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two gateways sharing a Redis hold a caller's rate_limit together: 3 calls an hour
    between them, then both refuse that caller, and neither refuses another."""
    callers = {"names": [{"name": "ingest", "rate_limit": "3/hour"}, {"name": "search"}]}
    model = openai_model(fake, key_file(tmp_path))
    quotas = {"redis_url": redis_server.url}
    async with (
        running([model], callers=callers, quotas=quotas) as one,
        running([model], callers=callers, quotas=quotas) as two,
    ):
        who = {"x_embedgate_caller": "ingest"}
        await embed(one, texts("a"), **who)
        await embed(two, texts("b"), **who)
        await embed(one, texts("c"), **who)
        for gateway in (one, two):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await embed(gateway, texts("d"), **who)
            assert quota_failure(refused.value)[0] == "CALLER_QUOTA_EXCEEDED"
        await embed(two, texts("e"), x_embedgate_caller="search")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {
                "server": {"auth": {"tokens": [{"name": "a", "token_env": "T"}]}},
                "callers": {"names": [{"name": "x"}]},
            },
            "callers.names: with server.auth",
        ),
        ({"callers": {"names": [{"name": "x"}, {"name": "x"}]}}, "caller names must be unique"),
        (
            {"callers": {"names": [{"name": "x", "rate_limit": "lots"}]}},
            "callers.names[0].rate_limit",
        ),
        ({"callers": {"header": "X Caller"}}, "callers.header"),
    ],
)
def test_a_bad_callers_section_names_its_key(config: dict[str, Any], message: str) -> None:
    """Each mistake in the callers' settings stops start-up naming the key."""
    raw = {**config, "models": [{"name": "m", "provider": "local"}]}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


async def test_embedgate_usage_prints_each_callers_counters_and_windows(
    fake: FakeVendor,
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`embedgate usage` reads a gateway's /metrics (the counters per caller and model)
    and, given the configuration, what each caller's limit windows hold now in the
    quotas' Redis."""
    callers = {"names": [{"name": "ingest", "rate_limit": "5/hour"}, {"name": "search"}]}
    model = openai_model(fake, key_file(tmp_path))
    quotas = {"redis_url": redis_server.url}
    config = tmp_path / "embedgate.yaml"
    config.write_text(yaml.safe_dump({"callers": callers, "quotas": quotas, "models": [model]}))
    async with running([model], callers=callers, quotas=quotas, metrics_port=0) as gateway:
        await embed(gateway, texts("a", "b"), x_embedgate_caller="ingest")
        await embed(gateway, texts("c"), x_embedgate_caller="ingest")
        await embed(gateway, texts("d"), x_embedgate_caller="search")
        metrics = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
        capsys.readouterr()
        code = await asyncio.to_thread(
            cli.main, ["usage", "--metrics", metrics, "--config", str(config), "--json"]
        )
        report = json.loads(capsys.readouterr().out)
        table_code = await asyncio.to_thread(cli.main, ["usage", "--metrics", metrics])
        table = capsys.readouterr().out
    assert (code, table_code) == (0, 0)
    rows = {row["caller"]: row for row in report["counters"]}
    assert (rows["ingest"]["calls"], rows["ingest"]["inputs"]) == (2, 3)
    assert (rows["search"]["calls"], rows["search"]["inputs"]) == (1, 1)
    assert report["limits"] == [
        {"caller": "ingest", "limit": "rate_limit", "rate": "5/hour", "used": 2, "allowed": 5}
    ]
    assert "caller" in table.splitlines()[1]
    assert any(line.split()[:2] == ["ingest", "m"] for line in table.splitlines())


async def test_a_per_second_limit_never_admits_more_in_any_second() -> None:
    """A caller's 5/second, called twice every 50 ms for 3 s (a clock the test moves):
    no one-second window, wherever it starts, holds more than 5 admitted calls (no
    double burst across a window's edge), and the limit is used, not just refused."""
    now = [0.0]
    metrics = Metrics()
    callers = Callers(
        metrics,
        known={"a": CallerConfig(name="a", rate_limit="5/second")},
        store=LocalStore(clock=lambda: now[0]),
    )
    model: Any = SimpleNamespace(name="m", info=SimpleNamespace(in_process=False))
    admitted: list[float] = []
    for _ in range(60):
        for _ in range(2):
            access = Access("Embed", metrics)
            access.caller = "a"
            try:
                async with callers.billed(access, model, [TextInput("x")]) as bill:
                    bill.embedded(tokens=1, model_requests=1)
            except CallerQuotaExceededError:
                continue
            admitted.append(now[0])
        now[0] += 0.05
    assert max(sum(1 for u in admitted if t <= u < t + 1) for t in admitted) <= 5
    assert len(admitted) >= 10
