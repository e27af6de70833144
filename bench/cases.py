"""The throughput cases: what runs where, how each is checked, and how it is measured.

Each case starts its own processes (the server under test pinned to one core, the
fake vendor and h2load on the other), checks that the server answers correctly with
a real call, then, for each concurrency, runs h2load three ways: a timed probe that
warms the server up and sizes the run, then ``repetitions`` runs of a fixed number
of requests, read between ``/proc`` and fake-vendor snapshots. Figures are medians
over the repetitions.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.client
import statistics
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from bench import litellm_proxy
from bench.fake_vendor import Counters, read_stats
from bench.gateway import (
    EMBED_METHOD,
    MODEL,
    TEXT,
    VENDOR_MODEL,
    GatewaySettings,
    came_from_cache,
    check_embed,
    embed_request,
    free_port,
    start_gateway,
)
from bench.load import JSON_HEADERS, LoadResult, Target, grpc_target, http_target, run_h2load
from bench.procs import BenchError, Child, Cores, cpu_seconds, memory_kib, pinned, python_module

Kind = Literal[
    "direct", "echo", "naive-httpx", "naive-aiohttp", "embedgate", "embedgate-openai", "litellm"
]
KIB_PER_MB = 1000 * 1000 / 1024  # memory is reported in MB (10^6 bytes)
JSON_CONTENT = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class Case:
    """One server under test. embedgate cases use embedgate's defaults (configuration
    and log level) but for what a field here sets: None leaves the default."""

    key: str
    label: str
    kind: Kind
    coalesce_wait_ms: float | None = None
    cache: bool = True
    log_level: str | None = None
    # Only these concurrencies (of the plan's); None: every one.
    concurrencies: tuple[int, ...] | None = None
    # Traces on, every call sampled, exported to a collector on loopback.
    tracing: bool = False
    # Run the server code of the revision given with --before (see BEFORE).
    before: bool = False


CASES: tuple[Case, ...] = (
    Case("a", "direct to the fake vendor (HTTP/1.1)", "direct"),
    Case("b", "grpc.aio echo (the floor)", "echo"),
    Case("n1", "naive gateway: httpx + float JSON", "naive-httpx"),
    Case("n2", "naive gateway: aiohttp + base64", "naive-aiohttp"),
    # The order within a turn matters: a case run right after one that sends a vendor
    # request per RPC (n1, n2, c) measures slower, by about 7 % on d seen side by side.
    # So the cases the tight goals compare (e, the d's, dw) follow light ones or each
    # other, and c comes last of embedgate's.
    # Two server processes of the same code differ in CPU per RPC by up to about 6 %
    # for as long as they live (each process's memory layout): a comparison between two
    # codes that must resolve less than that takes two processes of each (d and d2, d0
    # and d02), taking turns alternately.
    # d through the OpenAI door: the same call as an HTTP/1.1 POST /v1/embeddings.
    Case("o", "embedgate, as d through the OpenAI route", "embedgate-openai", cache=False),
    # The default configuration as it is: every RPC after the first is a hit.
    Case("e", "embedgate, default config, all cache hits", "embedgate"),
    # h2load sends one text over and over: the cases that measure the vendor path turn
    # the cache off, which is their one departure from the default configuration.
    # d on the code of --before (the commit before tracing): tracing off costs what?
    Case("d0", "embedgate before tracing (--before), as d", "embedgate", cache=False, before=True),
    Case("d", "embedgate, default config, cache off", "embedgate", cache=False),
    Case(
        "d02", "embedgate before tracing, a second process", "embedgate", cache=False, before=True
    ),
    Case("d2", "embedgate, as d, a second process", "embedgate", cache=False),
    # d again, writing only warnings: the difference is the access log's cost.
    Case(
        "dw",
        "embedgate, as d at --log-level warning",
        "embedgate",
        cache=False,
        log_level="warning",
    ),
    # d with tracing on: the cost of a trace of every call.
    Case(
        "dt",
        "embedgate, as d with tracing on (every call sampled)",
        "embedgate",
        cache=False,
        tracing=True,
    ),
    Case("c", "embedgate, coalescing off, cache off", "embedgate", coalesce_wait_ms=0, cache=False),
    Case("l", "LiteLLM proxy, 1 worker (HTTP/1.1)", "litellm", concurrencies=(16,)),
)


# The server code of an earlier revision (``--before``): a tree with its ``server`` and
# ``clients/python``, put first on the case's PYTHONPATH. None: no such case runs.
BEFORE: Path | None = None
# Spans and exports may not be dropped for want of room: the tracing case measures
# the cost of exporting every span.
TRACING_ENV = {"OTEL_BSP_MAX_QUEUE_SIZE": "262144", "OTEL_BSP_SCHEDULE_DELAY": "1000"}


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how often each case is measured."""

    concurrencies: tuple[int, ...]
    repetitions: int
    probe_s: float
    measure_s: float
    min_requests: int
    max_requests: int
    dims: int = 1024
    vendor_max_inputs: int = 16


@dataclass(frozen=True, slots=True)
class Repetition:
    rpcs: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_rpc: float
    vendor_cpu_us_per_rpc: float | None
    vendor_requests: int | None


@dataclass(frozen=True, slots=True)
class Level:
    """One case at one concurrency: medians over the repetitions."""

    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_rpc: float
    vendor_cpu_us_per_rpc: float | None
    vendor_requests_per_rpc: float | None
    peak_rss_mb: float
    rpcs: int
    failed: int
    repetitions: tuple[Repetition, ...]


@dataclass(frozen=True, slots=True)
class CaseResult:
    key: str
    label: str
    kind: Kind
    levels: tuple[Level, ...]
    error: str | None = None
    notes: tuple[str, ...] = ()
    skipped: str | None = None  # not measured, and why (never a silent omission)


@dataclass
class Deployment:
    """The running processes of one case."""

    server: Child  # whose CPU and memory are the case's figures
    target: Target
    check: Callable[[], None]
    vendor: Child | None = None
    vendor_port: int | None = None
    notes: list[str] = field(default_factory=list)
    # Says, once every level is measured, what the case's helpers saw (a note).
    finish: Callable[[], str] | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    server_cpu_s: float
    vendor_cpu_s: float | None
    vendor: Counters | None


def start_vendor(
    name: str, core: int | None, plan: Plan, work_dir: Path, latency_ms: float = 0.0
) -> tuple[Child, int]:
    command = python_module(
        "bench.fake_vendor",
        f"--dims={plan.dims}",
        f"--max-inputs={plan.vendor_max_inputs}",
        f"--latency-ms={latency_ms}",
    )
    child = Child(name, pinned(command, core), work_dir)
    try:
        return child, child.read_port()
    except BaseException:
        child.stop()
        raise


def direct_body() -> bytes:
    """What embedgate sends the vendor for one text, as the direct case sends it."""
    return orjson.dumps({"model": VENDOR_MODEL, "input": [TEXT], "encoding_format": "base64"})


def check_direct(port: int, dims: int) -> None:
    check_embeddings(port, direct_body(), dims, "the fake vendor")


def check_embeddings(port: int, body: bytes, dims: int, who: str) -> None:
    """One POST /v1/embeddings of ``body`` must answer 200 with a base64 vector of
    ``dims`` float32 values."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/v1/embeddings", body, JSON_CONTENT)
        reply = connection.getresponse()
        payload = orjson.loads(reply.read())
    finally:
        connection.close()
    vector = base64.b64decode(payload["data"][0]["embedding"])
    if reply.status != 200 or len(vector) != 4 * dims:
        raise BenchError(f"{who} answered {reply.status} with {len(vector)} bytes")


@contextmanager
def deployed(case: Case, plan: Plan, cores: Cores, work_dir: Path) -> Iterator[Deployment]:
    """Start the case's processes; stop them all on the way out."""
    children: list[Child] = []
    try:
        yield _deploy(case, plan, cores, work_dir, children)
    finally:
        for child in reversed(children):
            child.stop()


def _deploy(
    case: Case, plan: Plan, cores: Cores, work_dir: Path, children: list[Child]
) -> Deployment:
    if case.kind == "direct":
        return _deploy_direct(case, plan, cores, work_dir, children)
    if case.kind == "litellm":
        return _deploy_litellm(case, plan, cores, work_dir, children)
    if case.kind == "echo":
        command = python_module("bench.servers", "echo", f"--dims={plan.dims}")
        server = _start_server(f"case-{case.key}", command, cores, work_dir, children)
        return _grpc_deployment(server, server.read_port(), plan, work_dir)
    vendor, vendor_port = start_vendor(f"case-{case.key}-vendor", cores.load, plan, work_dir)
    children.append(vendor)
    if case.kind in ("embedgate", "embedgate-openai"):
        http_port = free_port() if case.kind == "embedgate-openai" else None
        env: dict[str, str] = {}
        finish = None
        tracing_endpoint = None
        if case.tracing:
            sink = Child(
                f"case-{case.key}-collector",
                pinned(python_module("bench.otlp_sink"), cores.load),
                work_dir,
            )
            children.append(sink)
            sink_port = sink.read_port()
            tracing_endpoint = f"http://127.0.0.1:{sink_port}"
            env.update(TRACING_ENV)
            finish = functools.partial(_collected, sink_port)
        if case.before:
            if BEFORE is None:
                raise BenchError("needs --before REV")
            env["PYTHONPATH"] = f"{BEFORE / 'server'}:{BEFORE / 'clients' / 'python'}"
        settings = GatewaySettings(
            vendor_port=vendor_port,
            dims=plan.dims,
            max_batch=plan.vendor_max_inputs,
            coalesce_wait_ms=case.coalesce_wait_ms,
            cache=case.cache,
            log_level=case.log_level,
            http_port=http_port,
            tracing_endpoint=tracing_endpoint,
        )
        server, port = start_gateway(f"case-{case.key}", settings, cores.server, work_dir, env=env)
        children.append(server)
        if http_port is not None:
            return _openai_deployment(server, http_port, plan, work_dir, vendor, vendor_port)
    else:
        url = f"http://127.0.0.1:{vendor_port}/v1"
        command = python_module("bench.servers", case.kind, f"--vendor-url={url}")
        server = _start_server(f"case-{case.key}", command, cores, work_dir, children)
        port = server.read_port()
    deployment = _grpc_deployment(server, port, plan, work_dir, vendor, vendor_port)
    if case.cache:
        deployment.notes.append(_warm_cache(port, plan.dims))
    if case.kind in ("embedgate", "embedgate-openai"):
        deployment.finish = finish
        if case.before and BEFORE is not None:
            deployment.notes.append(f"the server code of {BEFORE.name}")
    return deployment


def _collected(port: int) -> str:
    """What the tracing case's collector received, as a note."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as reply:
        counted = orjson.loads(reply.read())
    return (
        f"{counted['spans']:,} spans reached the collector, in {counted['requests']:,} "
        "OTLP/HTTP exports"
    )


def openai_body() -> bytes:
    """The OpenAI route's request for the benchmark's text, as the SDK sends it."""
    return orjson.dumps({"model": MODEL, "input": [TEXT], "encoding_format": "base64"})


def check_openai(port: int, dims: int) -> None:
    check_embeddings(port, openai_body(), dims, "the OpenAI route")


def _openai_deployment(
    server: Child, port: int, plan: Plan, work_dir: Path, vendor: Child, vendor_port: int
) -> Deployment:
    # h2c, one connection with N streams, as the gRPC cases get: the same transport, so
    # the two cases differ in the door alone. (h2load's HTTP/1.1 parser also refuses
    # hypercorn's status line, which has an empty reason phrase, as RFC 9112 allows.)
    target = dataclasses.replace(
        http_target(port, "/v1/embeddings", openai_body(), work_dir), http1=False
    )
    return Deployment(server, target, lambda: check_openai(port, plan.dims), vendor, vendor_port)


def _deploy_direct(
    case: Case, plan: Plan, cores: Cores, work_dir: Path, children: list[Child]
) -> Deployment:
    # The vendor is the server under test here, so it gets the server's core.
    vendor, port = start_vendor(f"case-{case.key}-vendor", cores.server, plan, work_dir)
    children.append(vendor)
    target = http_target(port, "/v1/embeddings", direct_body(), work_dir)
    return Deployment(vendor, target, lambda: check_direct(port, plan.dims), vendor, port)


def _deploy_litellm(
    case: Case, plan: Plan, cores: Cores, work_dir: Path, children: list[Child]
) -> Deployment:
    version = litellm_proxy.ensure_installed()
    vendor, vendor_port = start_vendor(f"case-{case.key}-vendor", cores.load, plan, work_dir)
    children.append(vendor)
    name = f"case-{case.key}"
    server, port, key = litellm_proxy.start(name, vendor_port, cores.server, work_dir)
    children.append(server)
    body = direct_body()
    headers = (*JSON_HEADERS, f"authorization: Bearer {key}")
    target = http_target(port, "/v1/embeddings", body, work_dir, headers)
    deployment = Deployment(
        server, target, lambda: litellm_proxy.check(port, key, body, plan.dims), vendor, vendor_port
    )
    deployment.notes.append(
        f"LiteLLM {version} (`{litellm_proxy.SPEC}` from the package index, in its own "
        "virtualenv), `litellm --config` with `--num_workers 1`, a master key, "
        "`LITELLM_OFFLINE_MODE=true`, its default log level"
    )
    return deployment


def _start_server(
    name: str, command: list[str], cores: Cores, work_dir: Path, children: list[Child]
) -> Child:
    server = Child(name, pinned(command, cores.server), work_dir)
    children.append(server)
    return server


def _grpc_deployment(
    server: Child,
    port: int,
    plan: Plan,
    work_dir: Path,
    vendor: Child | None = None,
    vendor_port: int | None = None,
) -> Deployment:
    target = grpc_target(port, EMBED_METHOD, embed_request(), work_dir)
    return Deployment(server, target, lambda: _check_grpc(port, plan.dims), vendor, vendor_port)


def _check_grpc(port: int, dims: int) -> None:
    check_embed(port, dims)


def _warm_cache(port: int, dims: int) -> str:
    """Store the benchmark text's vector, then say whether a second call was a hit."""
    check_embed(port, dims)
    cached = came_from_cache(check_embed(port, dims))
    if cached is None:
        return "the contract has no `cached` flag: hits are told by the vendor's counters"
    if cached:
        return "checked before measuring: the second call's vector came from the cache"
    return "checked before measuring: the second call's vector did NOT come from the cache"


def snapshot(deployment: Deployment) -> Snapshot:
    vendor = deployment.vendor
    separate_vendor = vendor is not None and vendor is not deployment.server
    return Snapshot(
        server_cpu_s=cpu_seconds(deployment.server.pid),
        vendor_cpu_s=cpu_seconds(vendor.pid) if separate_vendor and vendor else None,
        vendor=read_stats(deployment.vendor_port) if deployment.vendor_port else None,
    )


def probe_count(deployment: Deployment, concurrency: int, plan: Plan, cores: Cores) -> int:
    """Check the deployment answers, warm it up at ``concurrency`` for a timed second,
    and size its measured runs from the rate that gives."""
    deployment.check()
    probe = run_h2load(
        deployment.target,
        concurrency,
        core=cores.load,
        duration_s=plan.probe_s,
        timeout_s=plan.probe_s + 30,
    )
    return int(min(plan.max_requests, max(plan.min_requests, probe.rps * plan.measure_s)))


def measure_repetition(
    deployment: Deployment,
    concurrency: int,
    count: int,
    number: int,
    plan: Plan,
    cores: Cores,
    work_dir: Path,
) -> Repetition:
    log_file = work_dir / f"h2load-{deployment.server.name}-{concurrency}-{number}.log"
    before = snapshot(deployment)
    result = run_h2load(
        deployment.target,
        concurrency,
        core=cores.load,
        count=count,
        log_file=log_file,
        timeout_s=plan.measure_s * 6 + 30,
    )
    after = snapshot(deployment)
    log_file.unlink(missing_ok=True)
    return _repetition(result, before, after)


def finish_level(deployment: Deployment, concurrency: int, repetitions: list[Repetition]) -> Level:
    deployment.server.check_alive()
    deployment.check()  # still correct after the load
    return _level(concurrency, repetitions, memory_kib(deployment.server.pid, "VmHWM"))


def _repetition(result: LoadResult, before: Snapshot, after: Snapshot) -> Repetition:
    rpcs = result.succeeded
    vendor_cpu = None
    if before.vendor_cpu_s is not None and after.vendor_cpu_s is not None:
        vendor_cpu = (after.vendor_cpu_s - before.vendor_cpu_s) / rpcs * 1e6
    vendor_requests = None
    if before.vendor is not None and after.vendor is not None:
        vendor_requests = after.vendor.requests - before.vendor.requests
    return Repetition(
        rpcs=rpcs,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us_per_rpc=(after.server_cpu_s - before.server_cpu_s) / rpcs * 1e6,
        vendor_cpu_us_per_rpc=vendor_cpu,
        vendor_requests=vendor_requests,
    )


def _level(concurrency: int, repetitions: list[Repetition], peak_kib: int) -> Level:
    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    rpcs = sum(rep.rpcs for rep in repetitions)
    vendor_cpu = [
        r.vendor_cpu_us_per_rpc for r in repetitions if r.vendor_cpu_us_per_rpc is not None
    ]
    vendor_requests = [r.vendor_requests for r in repetitions if r.vendor_requests is not None]
    return Level(
        concurrency=concurrency,
        rps=median([r.rps for r in repetitions]),
        p50_ms=median([r.p50_ms for r in repetitions]),
        p99_ms=median([r.p99_ms for r in repetitions]),
        cpu_us_per_rpc=median([r.cpu_us_per_rpc for r in repetitions]),
        vendor_cpu_us_per_rpc=median(vendor_cpu) if vendor_cpu else None,
        vendor_requests_per_rpc=sum(vendor_requests) / rpcs if vendor_requests else None,
        peak_rss_mb=peak_kib / KIB_PER_MB,
        rpcs=rpcs,
        failed=0,  # run_h2load refuses any run with a failed request
        repetitions=tuple(repetitions),
    )


def case_concurrencies(case: Case, plan: Plan) -> tuple[int, ...]:
    if case.concurrencies is None:
        return plan.concurrencies
    return tuple(c for c in plan.concurrencies if c in case.concurrencies)


def skipped(case: Case, why: str) -> CaseResult:
    return CaseResult(case.key, case.label, case.kind, (), skipped=why)


class _Running:
    """A case while the cases take turns: its deployment, levels so far, and why it
    stopped, if it did."""

    def __init__(self, case: Case, concurrencies: tuple[int, ...]) -> None:
        self.case = case
        self.concurrencies = concurrencies
        self.deployment: Deployment | None = None
        self.levels: list[Level] = []
        self.error: str | None = None
        self.skipped: str | None = None

    def result(self) -> CaseResult:
        case = self.case
        if self.skipped is not None:
            return skipped(case, self.skipped)
        notes = tuple(self.deployment.notes) if self.deployment is not None else ()
        return CaseResult(case.key, case.label, case.kind, tuple(self.levels), self.error, notes)


def run_cases(cases: Sequence[Case], plan: Plan, cores: Cores, work_dir: Path) -> list[CaseResult]:
    """Measure every case at each of its concurrencies, the cases taking turns.

    Every case's processes start first and stay up (idle but for their turn). At each
    concurrency, each case is warmed up and sized, then the measured runs go round the
    cases, the order turning each round: the machine's speed drifts over minutes, and a
    ratio between two cases should not measure that drift. A failure stops its case
    alone, and is recorded, not raised; so is a case that cannot run here (skipped, with
    why)."""
    running = [_Running(case, case_concurrencies(case, plan)) for case in cases]
    with ExitStack() as stack:
        for one in running:
            if not one.concurrencies:
                one.skipped = (
                    "measured only at concurrency "
                    + ", ".join(str(c) for c in one.case.concurrencies or ())
                    + ", which this run does not have"
                )
                continue
            try:
                one.deployment = stack.enter_context(deployed(one.case, plan, cores, work_dir))
            except litellm_proxy.UnavailableError as problem:
                one.skipped = str(problem)
            except BenchError as problem:
                one.error = str(problem)
        for concurrency in plan.concurrencies:
            _run_level(running, concurrency, plan, cores, work_dir)
        for one in running:
            if one.deployment is not None and one.deployment.finish is not None:
                try:
                    one.deployment.notes.append(one.deployment.finish())
                except OSError as problem:
                    one.deployment.notes.append(f"its helper did not answer: {problem}")
    return [one.result() for one in running]


def _live(running: Sequence[_Running], concurrency: int) -> list[_Running]:
    return [
        one
        for one in running
        if one.deployment is not None and one.error is None and concurrency in one.concurrencies
    ]


def _run_level(
    running: Sequence[_Running], concurrency: int, plan: Plan, cores: Cores, work_dir: Path
) -> None:
    counts: dict[str, int] = {}
    for one in _live(running, concurrency):
        assert one.deployment is not None
        try:
            counts[one.case.key] = probe_count(one.deployment, concurrency, plan, cores)
        except BenchError as problem:
            one.error = str(problem)
    repetitions: dict[str, list[Repetition]] = {key: [] for key in counts}
    for number in range(plan.repetitions):
        turn = _live(running, concurrency)
        shift = number % len(turn) if turn else 0
        for one in turn[shift:] + turn[:shift]:
            assert one.deployment is not None
            try:
                repetitions[one.case.key].append(
                    measure_repetition(
                        one.deployment,
                        concurrency,
                        counts[one.case.key],
                        number,
                        plan,
                        cores,
                        work_dir,
                    )
                )
            except BenchError as problem:
                one.error = str(problem)
    for one in _live(running, concurrency):
        assert one.deployment is not None
        try:
            one.levels.append(finish_level(one.deployment, concurrency, repetitions[one.case.key]))
        except BenchError as problem:
            one.error = str(problem)
