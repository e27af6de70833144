"""The Grafana dashboard and the alerting rules under deploy/, checked against a real
Prometheus scraping a real gateway: after traffic that touches every panel (two doors,
cache hits, a deployment whose breaker opens, a vendor 429, a spent vendor quota, a
caller over its limit, a model NOT_SERVING), every panel's query and every alert's
expression evaluates without error and returns data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import yaml
from fakes import FakeVendor, Fault, make_fake
from gateways import deployment, key_file, openai_model, running
from prometheus_server import PrometheusServer
from vendor_world import eventually

from embedgate.server.edge.server import Gateway
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "embedgate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "embedgate-alerts.yml"
# What Grafana puts in place of its variables when it runs a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s"}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def alert_rules() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def test_the_dashboard_is_well_formed() -> None:
    """Each panel has a unique id, a place on the grid, the Prometheus datasource
    variable and at least one query with a refId of its own."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    names = [variable["name"] for variable in dashboard["templating"]["list"]]
    assert names == ["datasource"]
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert refs
        assert len(set(refs)) == len(refs)


def test_promtool_accepts_the_alerting_rules() -> None:
    """`promtool check rules` passes on the rule file."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/setup test (Debian's prometheus)"
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[dict[str, FakeVendor]]:
    names = ("good", "broken", "limited", "refusing")
    made = {name: make_fake("openai", api_key="vendor-key-for-tests") for name in names}
    for fake in made.values():
        await fake.start()
    try:
        yield made
    finally:
        for fake in made.values():
            await fake.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    return folder


def models(fakes: dict[str, FakeVendor], keys: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": "m",
            "breaker": {"failures": 1, "open_s": 600},
            "coalesce_wait_ms": 0,
            "deployments": [
                deployment(fakes["good"], keys, "good", max_retries=1),
                deployment(fakes["broken"], keys, "broken", max_retries=0),
            ],
        },
        openai_model(fakes["limited"], keys, name="limited", rate_limit="1/hour"),
        openai_model(fakes["refusing"], keys, name="refusing", max_retries=0),
        openai_model(fakes["broken"], keys, name="down", max_retries=0),
    ]


async def traffic(gateway: Gateway, fakes: dict[str, FakeVendor], round_: int) -> None:
    """A round of calls that moves every series the dashboard and the alerts read."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def call(model: str, text: str, caller: str = "search") -> None:
            request = pb.EmbedRequest(model=model, inputs=[pb.Input(text=text)])
            with contextlib.suppress(grpc.aio.AioRpcError):  # failures are part of it
                await stub.Embed(request, metadata=(("x-embedgate-caller", caller),))

        fakes["good"].plan(Fault.status(429, retry_after="0"))  # retried: a 429 counted
        for n in range(6):
            await call("m", f"text {round_}-{n}")
        await call("m", f"text {round_}-0")  # a cache hit
        await call("limited", f"quota {round_}-a")
        await call("limited", f"quota {round_}-b")  # its vendor quota is spent
        await call("refusing", f"refused {round_}")
        await call("down", f"down {round_}")  # UNAVAILABLE
        await call("m", f"ingest {round_}-a", caller="ingest")
        await call("m", f"ingest {round_}-b", caller="ingest")  # over its rate_limit
    async with httpx.AsyncClient() as http:
        await http.post(
            f"http://127.0.0.1:{gateway.http_port}/v1/embeddings",
            json={"model": "m", "input": f"door {round_}"},
        )


async def test_every_panel_and_alert_returns_data_from_a_real_prometheus(
    fakes: dict[str, FakeVendor], workdir: Path, tmp_path: Path
) -> None:
    """A real Prometheus scrapes a real gateway every second while traffic runs in two
    rounds; then every panel's query and every alert's expression is evaluated: each
    succeeds and returns at least one series."""
    fakes["broken"].always(Fault.status(500))
    fakes["refusing"].always(Fault.status(401))
    callers = {"names": [{"name": "search"}, {"name": "ingest", "rate_limit": "1/hour"}]}
    async with running(
        models(fakes, key_file(tmp_path)),
        callers=callers,
        cache=True,
        metrics_port=0,
        http_port=0,
        unhealthy_after_failures=1,
    ) as gateway:
        prometheus = PrometheusServer(workdir, [f"127.0.0.1:{gateway.metrics_port}"], [ALERTS])
        try:
            assert await eventually(lambda: prometheus.scrapes() >= 2, within_s=30)
            for round_ in (1, 2):
                await traffic(gateway, fakes, round_)
                seen = prometheus.scrapes()
                assert await eventually(lambda s=seen: prometheus.scrapes() >= s + 2, within_s=30)
            answers = {
                name: await asyncio.to_thread(prometheus.query, _grafana(expr))
                for name, expr in [*panel_queries(), *alert_rules()]
            }
        finally:
            prometheus.stop()
    failed = {name: answer for name, answer in answers.items() if answer["status"] != "success"}
    assert failed == {}
    empty = [name for name, answer in answers.items() if not answer["data"]["result"]]
    assert empty == []


def _grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr
