"""The gateway's memory with many open ``StreamEmbed`` calls.

A slow fake vendor (seconds per reply) holds every input, so the calls stay open in
the gateway; a client process opens them all over a few gRPC channels; the gateway's
VmRSS is read while the fake reports every input in flight (all calls open at once),
and every call must then finish with its vector.

``python -m bench.streams --target HOST:PORT --streams N`` is the client: it prints
``opened N`` once every call is started, then one JSON line with what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.cases import KIB_PER_MB, Plan, start_vendor
from bench.fake_vendor import read_stats
from bench.gateway import MODEL, TEXT, GatewaySettings, start_gateway
from bench.procs import BenchError, Child, Cores, memory_kib, pinned, python_module
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

CHANNELS = 10  # the calls are spread like ten client processes' would be


@dataclass(frozen=True, slots=True)
class StreamsPlan:
    streams: int
    vendor_latency_s: float


@dataclass(frozen=True, slots=True)
class StreamsResult:
    streams: int
    channels: int
    vendor_latency_s: float
    idle_rss_mb: float  # after start-up and one call
    open_rss_mb: float  # the highest VmRSS read while every call was open
    peak_rss_mb: float  # VmHWM at the end
    per_stream_kb: float  # (open - idle) / streams, in kB (10^3 bytes)
    all_open_at_once: bool
    max_inputs_in_flight: int
    completed: int
    failed: int
    vendor_requests: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ClientReport:
    completed: int
    failed: int
    wrong_size: int


# -- the client process ---------------------------------------------------------------


async def _one_stream(stub: pb_grpc.EmbeddingServiceAsyncStub, dims: int, timeout_s: float) -> str:
    request = pb.StreamEmbedRequest(
        request=pb.EmbedRequest(model=MODEL, inputs=[pb.Input(text=TEXT)])
    )
    try:
        messages = [message async for message in stub.StreamEmbed(request, timeout=timeout_s)]
    except grpc.RpcError:
        return "failed"
    if len(messages) != 1 or messages[0].HasField("error"):
        return "failed"
    return "completed" if len(messages[0].embedding.values) == dims else "wrong_size"


async def run_client(target: str, streams: int, dims: int, timeout_s: float) -> ClientReport:
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    try:
        stubs = [pb_grpc.EmbeddingServiceStub(channel) for channel in channels]
        tasks = [
            asyncio.create_task(_one_stream(stubs[n % CHANNELS], dims, timeout_s))
            for n in range(streams)
        ]
        await asyncio.sleep(0)  # let every task start its call
        print(f"opened {streams}", flush=True)
        outcomes = await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    return ClientReport(
        completed=outcomes.count("completed"),
        failed=outcomes.count("failed"),
        wrong_size=outcomes.count("wrong_size"),
    )


def client_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Open many StreamEmbed calls at once.")
    parser.add_argument("--target", required=True)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    report = asyncio.run(run_client(args.target, args.streams, args.dims, args.timeout_s))
    print(json.dumps(asdict(report)), flush=True)
    return 0


# -- the measurement ------------------------------------------------------------------


def rpc_cap(streams: int) -> int:
    """The gateway's cap on calls in progress: room for every stream, and the checks."""
    return max(512, streams + 64)


def measure_streams(
    streams: StreamsPlan, plan: Plan, cores: Cores, work_dir: Path
) -> StreamsResult:
    latency_ms = streams.vendor_latency_s * 1000
    vendor, vendor_port = start_vendor("streams-vendor", cores.load, plan, work_dir, latency_ms)
    try:
        settings = GatewaySettings(
            vendor_port=vendor_port,
            dims=plan.dims,
            max_batch=plan.vendor_max_inputs,
            coalesce_wait_ms=2.0,
            # Every input must reach the vendor at once for all the calls to be open
            # at once: no limit below the HTTP client's own connection pool.
            max_concurrency=256,
            # The default cap on calls in progress (512) would refuse the rest.
            max_concurrent_rpcs=rpc_cap(streams.streams),
            # Every call embeds the same text: with the cache on, calls would wait on
            # the first one's vector instead of reaching the vendor.
            cache=False,
        )
        gateway, port = start_gateway("streams-gateway", settings, cores.server, work_dir)
        try:
            return _hold_streams(streams, plan, cores, work_dir, gateway, port, vendor_port)
        finally:
            gateway.stop()
    finally:
        vendor.stop()


def _hold_streams(
    streams: StreamsPlan,
    plan: Plan,
    cores: Cores,
    work_dir: Path,
    gateway: Child,
    port: int,
    vendor_port: int,
) -> StreamsResult:
    idle_kib = memory_kib(gateway.pid, "VmRSS")
    before = read_stats(vendor_port)
    timeout_s = streams.vendor_latency_s * 4 + 30
    command = python_module(
        "bench.streams",
        f"--target=127.0.0.1:{port}",
        f"--streams={streams.streams}",
        f"--dims={plan.dims}",
        f"--timeout-s={timeout_s}",
    )
    started = time.monotonic()
    client = Child("streams-client", pinned(command, cores.load), work_dir)
    try:
        client.read_line(timeout_s=30)  # "opened N"
        open_kib, max_in_flight = _watch_open(gateway, vendor_port, timeout_s)
        report = _client_report(client.read_line(timeout_s=timeout_s))
    finally:
        client.stop()
    seconds = time.monotonic() - started
    after = read_stats(vendor_port)
    gateway.check_alive()
    return StreamsResult(
        streams=streams.streams,
        channels=CHANNELS,
        vendor_latency_s=streams.vendor_latency_s,
        idle_rss_mb=idle_kib / KIB_PER_MB,
        open_rss_mb=open_kib / KIB_PER_MB,
        peak_rss_mb=memory_kib(gateway.pid, "VmHWM") / KIB_PER_MB,
        per_stream_kb=(open_kib - idle_kib) * 1.024 / streams.streams,
        all_open_at_once=max_in_flight >= streams.streams,
        max_inputs_in_flight=max_in_flight,
        completed=report.completed,
        failed=report.failed + report.wrong_size,
        vendor_requests=after.requests - before.requests,
        seconds=seconds,
    )


def _watch_open(gateway: Child, vendor_port: int, timeout_s: float) -> tuple[int, int]:
    """Sample the gateway's VmRSS until the vendor has answered everything; return the
    highest sample taken while the most inputs were in flight, and that number."""
    deadline = time.monotonic() + timeout_s
    best_in_flight = 0
    rss_at_best = 0
    seen_any = False
    while time.monotonic() < deadline:
        in_flight = read_stats(vendor_port).in_flight_inputs
        rss = memory_kib(gateway.pid, "VmRSS")
        if in_flight > best_in_flight:
            best_in_flight, rss_at_best = in_flight, rss
        elif in_flight == best_in_flight and in_flight > 0:
            rss_at_best = max(rss_at_best, rss)
        seen_any = seen_any or in_flight > 0
        if seen_any and in_flight == 0:
            break
        time.sleep(0.05)
    if not seen_any:
        raise BenchError("no StreamEmbed input ever reached the vendor")
    return rss_at_best, best_in_flight


def _client_report(line: str) -> ClientReport:
    try:
        fields = json.loads(line)
        return ClientReport(
            int(fields["completed"]), int(fields["failed"]), int(fields["wrong_size"])
        )
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"the streams client printed {line!r}") from None


if __name__ == "__main__":
    raise SystemExit(client_main())
