"""``python -m bench.soak``: Embed RPCs through a model with one deployment down and the
other flaky; every RPC must succeed and every vector must be the one for its input.

The gateway is ``embedgate serve`` in a child process, as in the benchmark, with one
model of two deployments of the ``openai`` provider: ``down`` at a loopback port that is
bound but not listening (every connection refused), ``flaky`` at ``bench.flaky_vendor``
(503 and 429 at random, per-input vectors). The callers here send the RPCs through the
generated stubs with a bounded number in flight and check every vector; the gateway's
``/metrics`` gives the attempts per deployment and the breakers' transitions. The
results go to ``soak.json`` and to the soak section of ``benchmarks.md``, both in
``--out`` (default ``docs/``); the exit status is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.environment import changed_since_commit, git
from bench.fake_vendor import read_stats
from bench.flaky_vendor import text_vector
from bench.gateway import embedgate_command, free_port, wait_for_listening
from bench.procs import REPO, BenchError, Child, python_module
from bench.soak_report import (
    DOWN,
    FLAKY,
    Check,
    SoakPlan,
    SoakResult,
    splice,
    write_json,
)
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

MODEL = "soak"
VENDOR_MODEL = "fake-embedding"
REPORT_NAME = "benchmarks.md"
FAILURE_EXAMPLES = 5

PLAN = SoakPlan(
    rpcs=10_000,
    concurrency=32,
    time_limit_s=300.0,
    rpc_deadline_s=30.0,
    inputs_per_rpc=(1, 3, 1, 2, 1, 4),
    dims=64,
    unavailable=0.10,
    rate_limited=0.02,
    retry_after="0.05",
    seed=13,
    # An RPC fails only if all max_retries + 1 attempts fail: 0.12^9 = 5e-9 per RPC.
    max_retries=8,
    retry_backoff_s=0.01,
    retry_backoff_max_s=0.1,
    # The breaker's defaults, written out.
    breaker_failures=5,
    breaker_open_s=10.0,
    tolerance=1e-6,
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def texts_of(index: int, plan: SoakPlan) -> list[str]:
    """The distinct texts of RPC ``index``."""
    count = plan.inputs_per_rpc[index % len(plan.inputs_per_rpc)]
    return [f"soak rpc {index} input {position} of {count}" for position in range(count)]


def gateway_config(plan: SoakPlan, port: int, metrics_port: int, ports: dict[str, int]) -> Any:
    def deployment(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "openai",
            "base_url": f"http://127.0.0.1:{ports[name]}/v1",
            "vendor_model": VENDOR_MODEL,
            "dimensions": plan.dims,
            "max_batch": 16,
            "max_concurrency": plan.concurrency,
            "encoding_format": "base64",
            "timeout_s": 5,
            "max_retries": plan.max_retries,
            "retry_backoff_s": plan.retry_backoff_s,
            "retry_backoff_max_s": plan.retry_backoff_max_s,
        }

    return {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "metrics_port": metrics_port,
            "shutdown_grace_s": 1,
        },
        # Every vector must come from the vendor.
        "cache": {"enabled": False},
        "models": [
            {
                "name": MODEL,
                "space": "soak",
                # One vendor request per RPC: the counts below are retries, not batching.
                "coalesce_wait_ms": 0,
                "breaker": {"failures": plan.breaker_failures, "open_s": plan.breaker_open_s},
                "deployments": [deployment(DOWN), deployment(FLAKY)],
            }
        ],
    }


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused, and no
    other process can listen on it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


@contextmanager
def child(name: str, command: Sequence[str], work_dir: Path) -> Iterator[Child]:
    process = Child(name, command, work_dir)
    try:
        yield process
    finally:
        process.stop()


@dataclass
class Outcome:
    """What the callers saw."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first few
    vectors_checked: int = 0
    vectors_wrong: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    largest_difference: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def check(
        self, index: int, texts: Sequence[str], reply: pb.EmbedResponse, plan: SoakPlan
    ) -> None:
        """Each input's vector at its position, as the vendor derives it."""
        embeddings = reply.embeddings
        self.vectors_checked += len(texts)
        wrong = abs(len(embeddings) - len(texts))
        for position, (text, embedding) in enumerate(zip(texts, embeddings, strict=False)):
            got = np.asarray(embedding.values, dtype=np.float32)
            expected = text_vector(text, plan.dims)
            if embedding.index != position or got.shape != expected.shape:
                wrong += 1
                continue
            difference = float(np.max(np.abs(got - expected)))
            if difference > plan.tolerance:
                wrong += 1
            else:
                self.largest_difference = max(self.largest_difference, difference)
        if wrong:
            self.vectors_wrong += wrong
            if len(self.wrong_examples) < FAILURE_EXAMPLES:
                self.wrong_examples.append(
                    f"RPC {index}: {wrong} of {len(texts)} vectors missing or not their input's"
                )


async def drive(port: int, plan: SoakPlan) -> Outcome:
    """``plan.rpcs`` Embed RPCs, ``plan.concurrency`` in flight, none sent after
    ``plan.time_limit_s``."""
    outcome = Outcome()
    indices = iter(range(plan.rpcs))
    started = time.perf_counter()
    stop_at = started + plan.time_limit_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def caller() -> None:
            for index in indices:  # shared by every caller: each RPC is sent once
                if time.perf_counter() > stop_at:
                    return
                texts = texts_of(index, plan)
                request = pb.EmbedRequest(
                    model=MODEL,
                    inputs=[pb.Input(text=text) for text in texts],
                    request_id=f"soak-{index}",
                )
                outcome.sent += 1
                sent = time.perf_counter()
                try:
                    reply = await stub.Embed(request, timeout=plan.rpc_deadline_s)
                except grpc.aio.AioRpcError as error:
                    outcome.latencies_s.append(time.perf_counter() - sent)
                    outcome.failed += 1
                    if len(outcome.failures) < FAILURE_EXAMPLES:
                        outcome.failures.append(
                            f"RPC {index}: {error.code().name}: {error.details()}"
                        )
                    continue
                outcome.latencies_s.append(time.perf_counter() - sent)
                outcome.ok += 1
                outcome.check(index, texts, reply, plan)

        await asyncio.gather(*(caller() for _ in range(plan.concurrency)))
    outcome.seconds = time.perf_counter() - started
    return outcome


def scrape(metrics_port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        reply = connection.getresponse()
        text = reply.read().decode()
        if reply.status != 200:
            raise BenchError(f"/metrics answered HTTP {reply.status}")
        return text
    finally:
        connection.close()


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    attempts: dict[str, dict[str, int]]
    transitions: dict[str, dict[str, int]]
    breaker_states: dict[str, str]


BREAKER_STATES = {0: "closed", 1: "half_open", 2: "open"}


def gateway_figures(exposition: str) -> GatewayFigures:
    """The model's attempts, breaker transitions and breaker states, by deployment."""
    attempts: dict[str, dict[str, int]] = defaultdict(dict)
    transitions: dict[str, dict[str, int]] = defaultdict(dict)
    states: dict[str, str] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != MODEL:
                continue
            deployment = labels.get("deployment", "")
            if sample.name == "embedgate_deployment_requests_total":
                attempts[deployment][labels["outcome"]] = int(sample.value)
            elif sample.name == "embedgate_deployment_breaker_transitions_total":
                transitions[deployment][labels["state"]] = int(sample.value)
            elif sample.name == "embedgate_deployment_breaker_state":
                states[deployment] = BREAKER_STATES.get(int(sample.value), str(sample.value))
    return GatewayFigures(dict(attempts), dict(transitions), states)


def error_lines(log: Path) -> int:
    """Lines the gateway logged at error level or above."""
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            count += 1
    return count


def judge(result: SoakResult) -> tuple[Check, ...]:
    plan = result.plan
    down_moves = result.transitions.get(DOWN, {})
    flaky = result.attempts.get(FLAKY, {})
    answered = result.vendor_requests - result.vendor_unavailable - result.vendor_rate_limited
    before_open = result.attempts_at(DOWN) - result.probes
    bound = plan.breaker_failures + plan.concurrency
    return (
        Check(
            "every RPC sent, within the time limit",
            result.rpcs_sent == plan.rpcs,
            f"{result.rpcs_sent:,} of {plan.rpcs:,}",
        ),
        Check(
            "no RPC failed",
            result.rpcs_failed == 0 and result.rpcs_ok == result.rpcs_sent,
            f"{result.rpcs_failed} failed",
        ),
        Check(
            "every vector is its input's, in its place",
            result.vectors_wrong == 0 and result.vectors_checked > 0,
            f"{result.vectors_wrong} of {result.vectors_checked:,} not",
        ),
        Check(
            "the vendor failed requests: 503s and 429s were served",
            result.vendor_unavailable > 0 and result.vendor_rate_limited > 0,
            f"{result.vendor_unavailable:,} and {result.vendor_rate_limited:,}",
        ),
        Check(
            "the gateway's count of `flaky`'s answers is the vendor's",
            flaky.get("ok", 0) == answered and sum(flaky.values()) == result.vendor_requests,
            f"{flaky.get('ok', 0):,} answers of {sum(flaky.values()):,} attempts; "
            f"the vendor: {answered:,} of {result.vendor_requests:,}",
        ),
        Check(
            "`down`'s breaker opened, and `down` got no more than its probes after",
            down_moves.get("open", 0) >= 1 and before_open <= bound,
            f"opened {down_moves.get('open', 0)} times; {before_open} attempts before, "
            f"at most {bound} allowed (failures + RPCs in flight)",
        ),
        Check(
            "`flaky`'s breaker never left closed",
            not any(result.transitions.get(FLAKY, {}).values())
            and result.breaker_states.get(FLAKY) == "closed",
            f"{sum(result.transitions.get(FLAKY, {}).values())} transitions",
        ),
        Check(
            "the gateway logged no error",
            result.gateway_error_lines == 0,
            f"{result.gateway_error_lines} lines",
        ),
    )


def percentile_ms(latencies: Sequence[float], q: float) -> float:
    return float(np.percentile(latencies, q) * 1000) if latencies else float("nan")


def run(plan: SoakPlan, work_dir: Path) -> SoakResult:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with (
        refusing_port() as down_port,
        child(
            "flaky-vendor",
            python_module(
                "bench.flaky_vendor",
                "--port=0",
                f"--dims={plan.dims}",
                f"--unavailable={plan.unavailable}",
                f"--rate-limited={plan.rate_limited}",
                f"--retry-after={plan.retry_after}",
                f"--seed={plan.seed}",
            ),
            work_dir,
        ) as vendor,
    ):
        vendor_port = vendor.read_port()
        port, metrics_port = free_port(), free_port()
        config = work_dir / "soak.yaml"
        ports = {DOWN: down_port, FLAKY: vendor_port}
        config.write_text(
            yaml.safe_dump(gateway_config(plan, port, metrics_port, ports), sort_keys=False)
        )
        with child(
            "gateway", embedgate_command(config, port, "warning", "json"), work_dir
        ) as gateway:
            wait_for_listening(gateway, port, timeout_s=60)
            say(f"soak: {plan.rpcs:,} RPCs, {plan.concurrency} in flight")
            outcome = asyncio.run(drive(port, plan))
            gateway.check_alive()
            figures = gateway_figures(scrape(metrics_port))
            log = gateway.log_path
        counters = read_stats(vendor_port)
    latencies = outcome.latencies_s
    result = SoakResult(
        date=date,
        commit=git("rev-parse", "--short", "HEAD") or "unknown",
        uncommitted_changes=changed_since_commit("docs/benchmarks.md", "docs/soak.json"),
        cores=len(os.sched_getaffinity(0)),
        plan=plan,
        rpcs_sent=outcome.sent,
        rpcs_ok=outcome.ok,
        rpcs_failed=outcome.failed,
        failure_examples=tuple(outcome.failures + outcome.wrong_examples),
        vectors_checked=outcome.vectors_checked,
        vectors_wrong=outcome.vectors_wrong,
        largest_difference=outcome.largest_difference,
        seconds=outcome.seconds,
        rps=outcome.sent / outcome.seconds if outcome.seconds else 0.0,
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
        max_ms=max(latencies, default=0.0) * 1000,
        vendor_requests=counters.requests,
        vendor_inputs=counters.inputs,
        vendor_unavailable=counters.unavailable,
        vendor_rate_limited=counters.rate_limited,
        attempts=figures.attempts,
        transitions=figures.transitions,
        breaker_states=figures.breaker_states,
        gateway_error_lines=error_lines(log),
    )
    return replace(result, checks=judge(result))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--rpcs", type=int, default=PLAN.rpcs, help="default %(default)s")
    parser.add_argument(
        "--concurrency", type=int, default=PLAN.concurrency, help="in flight (%(default)s)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=PLAN.time_limit_s,
        help="seconds after which no RPC is sent (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=PLAN.seed, help="of the vendor's faults")
    parser.add_argument(
        "--retry-after",
        default=PLAN.retry_after,
        help="the Retry-After of the vendor's 429s, in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs", help="where soak.json and benchmarks.md are"
    )
    args = parser.parse_args(argv)
    if args.rpcs < 1 or args.concurrency < 1 or args.time_limit <= 0:
        parser.error("--rpcs and --concurrency must be at least 1, --time-limit above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = replace(
        PLAN,
        rpcs=args.rpcs,
        concurrency=args.concurrency,
        time_limit_s=args.time_limit,
        seed=args.seed,
        retry_after=args.retry_after,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="embedgate-soak-") as tmp:
            result = run(plan, Path(tmp))
    except BenchError as problem:
        say(f"soak: {problem}")
        return 2
    written = [write_json(result, out)]
    report = out / REPORT_NAME
    if report.exists():
        report.write_text(splice(report.read_text(), result))
        written.append(report)
    for check in result.checks:
        say(f"  {'passed' if check.passed else 'FAILED'}: {check.rule}: {check.measured}")
    for example in result.failure_examples:
        say(f"  {example}")
    say(
        f"soak: {result.rpcs_ok:,} of {result.rpcs_sent:,} RPCs OK in {result.seconds:.1f} s; "
        f"{result.vectors_wrong} of {result.vectors_checked:,} vectors wrong; "
        f"{result.vendor_requests_per_rpc:.3f} vendor requests per RPC"
    )
    say("wrote " + ", ".join(str(path) for path in written))
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
