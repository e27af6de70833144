"""The HTTP driver on httpx's own transport against the same driver on aiohttp's.

Starts a loopback OpenAI-style ``/v1/embeddings`` fake in a child process (its CPU is not
the client's), then sends the same requests through the real ``HttpDriver`` with each
transport, at each concurrency, for a fixed number of requests, and reports requests/s,
the client process's CPU per request (``time.process_time``), latency percentiles and the
ratio aiohttp/httpx. Transports alternate within each round, so drift on a shared machine
hits both alike.

    .venv/bin/python -m bench.transport                     # 3 rounds x 2,000 requests a cell
    .venv/bin/python bench/transport.py --rounds 5 --requests 5000 --concurrency 1 64

Bounded: every cell sends at most ``--requests`` requests and stops after
``--cell-seconds`` (reporting what it did); the whole run stops after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedgate.server.providers.http import Transport

DIMS = 1024
PATH = "/v1/embeddings"
WARMUP_REQUESTS = 200
TRANSPORT_NAMES: tuple[Transport, ...] = ("httpx", "aiohttp")


# -- the fake vendor (child process) -------------------------------------------------------


def _reply_body(count: int) -> bytes:
    """An OpenAI embeddings reply of `count` base64 vectors of DIMS float32 values."""
    values = [((i * 7919) % 1000 - 500) / 16000.0 for i in range(DIMS)]
    encoded = base64.b64encode(struct.pack(f"<{DIMS}f", *values)).decode()
    data = [{"object": "embedding", "index": i, "embedding": encoded} for i in range(count)]
    usage = {"prompt_tokens": count, "total_tokens": count}
    reply = {"object": "list", "data": data, "model": "bench", "usage": usage}
    return json.dumps(reply, separators=(",", ":")).encode()


_REPLIES: dict[int, bytes] = {}


class _FakeProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, just enough for POST with a Content-Length: as little
    CPU per request as a Python server can spend, so the client is what is measured."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            length = None
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length is None:
                self._send(411, b'{"error":{"message":"Content-Length required"}}')
                self._buffer.clear()
                return
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            method, target, _ = head[0].split(" ", 2)
            self._answer(method, target, body)

    def _answer(self, method: str, target: str, body: bytes) -> None:
        if method != "POST" or target != PATH:
            self._send(404, b'{"error":{"message":"not found"}}')
            return
        try:
            inputs = json.loads(body)["input"]
        except (ValueError, KeyError, TypeError):
            self._send(400, b'{"error":{"message":"bad request"}}')
            return
        count = 1 if isinstance(inputs, str) else len(inputs)
        reply = _REPLIES.get(count)
        if reply is None:
            reply = _REPLIES[count] = _reply_body(count)
        self._send(200, reply)

    def _send(self, status: int, body: bytes) -> None:
        assert self._transport is not None
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required"}
        head = (
            f"HTTP/1.1 {status} {reason[status]}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        self._transport.write(head + body)


async def _serve_fake() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_FakeProtocol, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    # The parent closes our stdin when it is done (or dies): that is the signal to stop.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    server.close()


# -- the client (this process) -------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    transport: Transport
    concurrency: int
    requests: int
    seconds: float
    cpu_seconds: float
    # Per-request latency (ms): a machine that stalls every process at once shows here,
    # as a max far above the p99.
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.requests * 1e6


async def _drive(
    url: str, transport: Transport, concurrency: int, requests: int, cap_s: float
) -> Cell:
    # Imported here, not at the top: the fake vendor's process has no use for it.
    from embedgate.server.providers.http import HttpDriver, RetryPolicy, post

    driver = HttpDriver(transport=transport)
    policy = RetryPolicy(max_retries=0, attempt_timeout_s=10)
    limit = asyncio.Semaphore(concurrency)
    body = json.dumps({"model": "bench", "input": ["two apples"], "encoding_format": "base64"})
    payload = body.encode()
    headers = {"content-type": "application/json", "authorization": "Bearer bench"}
    expected = len(_reply_body(1))

    latencies: list[float] = []

    async def one() -> None:
        started = time.perf_counter()
        reply = await post(driver, url, payload, headers, policy=policy, limit=limit, vendor="b")
        latencies.append(time.perf_counter() - started)
        if reply.status != 200 or len(reply.content) != expected:
            raise RuntimeError(f"unexpected reply: HTTP {reply.status}, {len(reply.content)} B")

    async def run(total: int, stop_at: float) -> int:
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < total and time.perf_counter() < stop_at:
                sent += 1
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sent

    await driver.start()
    try:
        await run(max(WARMUP_REQUESTS, concurrency), time.perf_counter() + cap_s)
        latencies.clear()
        started, cpu = time.perf_counter(), time.process_time()
        done = await run(requests, started + cap_s)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
        ms = sorted(1000 * s for s in latencies)
        return Cell(
            transport,
            concurrency,
            done,
            seconds,
            cpu_seconds,
            p50_ms=ms[len(ms) // 2],
            p99_ms=ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            max_ms=ms[-1],
        )
    finally:
        await driver.close()


@contextmanager
def _fake_vendor(cpu: int | None) -> Iterator[str]:
    """The fake in a child process (on `cpu` alone when given); yields its URL."""
    # -P: the fake needs only the standard library, never a module of bench/ that shares
    # its name (bench/profile.py).
    command = [sys.executable, "-P", str(Path(__file__).resolve()), "--serve-fake"]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    fake = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert fake.stdout is not None
        line = fake.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "port":
            raise RuntimeError("the fake vendor did not start")
        yield f"http://127.0.0.1:{line[1]}{PATH}"
    finally:
        assert fake.stdin is not None
        fake.stdin.close()
        try:
            fake.wait(timeout=5)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait()


async def _measure(url: str, args: argparse.Namespace) -> list[list[Cell]]:
    rounds: list[list[Cell]] = []
    async with asyncio.timeout(args.max_seconds):
        for number in range(args.rounds):
            order = TRANSPORT_NAMES if number % 2 == 0 else TRANSPORT_NAMES[::-1]
            cells = []
            for concurrency in args.concurrency:
                for transport in order:
                    cell = await _drive(
                        url, transport, concurrency, args.requests, args.cell_seconds
                    )
                    cells.append(cell)
                    print(
                        f"round {number + 1}  {transport:7}  c={concurrency:<3}"
                        f"  {cell.requests:6} req  {cell.rps:8.0f} req/s"
                        f"  {cell.cpu_us:7.0f} us CPU/req  p50 {cell.p50_ms:6.1f} ms"
                        f"  p99 {cell.p99_ms:6.1f} ms  max {cell.max_ms:7.1f} ms",
                        flush=True,
                    )
            rounds.append(cells)
    return rounds


def _report(rounds: list[list[Cell]], concurrencies: list[int]) -> None:
    print()
    print("aiohttp / httpx, per round, then median [min-max]")
    print(f"{'c':>4}  {'metric':14} {'per round':32} median   range")
    for concurrency in concurrencies:
        for metric, better in (("req/s", "higher"), ("CPU us/req", "lower")):
            ratios = []
            for cells in rounds:
                by = {c.transport: c for c in cells if c.concurrency == concurrency}
                if set(by) != set(TRANSPORT_NAMES):
                    continue
                a, h = by["aiohttp"], by["httpx"]
                ratios.append(a.rps / h.rps if metric == "req/s" else a.cpu_us / h.cpu_us)
            if not ratios:
                continue
            shown = " ".join(f"{r:.2f}" for r in ratios)
            print(
                f"{concurrency:>4}  {metric:14} {shown:32} {statistics.median(ratios):.2f}"
                f"   [{min(ratios):.2f}-{max(ratios):.2f}]  ({better} is better for aiohttp)"
            )
    print()
    print("absolute, median [min-max] over rounds")
    for concurrency in concurrencies:
        for transport in TRANSPORT_NAMES:
            cells = [
                c
                for cells in rounds
                for c in cells
                if c.concurrency == concurrency and c.transport == transport
            ]
            if not cells:
                continue
            rps = [c.rps for c in cells]
            cpu = [c.cpu_us for c in cells]
            print(
                f"{concurrency:>4}  {transport:7}  {statistics.median(rps):7.0f} req/s"
                f" [{min(rps):.0f}-{max(rps):.0f}]"
                f"   {statistics.median(cpu):6.0f} us CPU/req [{min(cpu):.0f}-{max(cpu):.0f}]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="per cell (after warm-up)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--cell-seconds", type=float, default=20.0, help="cap per cell")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="cap for the run")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not give the fake its own CPU"
    )
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        asyncio.run(_serve_fake())
        return
    if args.rounds < 1 or args.requests < 1 or min(args.concurrency) < 1:
        parser.error("--rounds, --requests and --concurrency must be at least 1")
    # On a machine with two CPUs or more, the fake gets the last one and this process
    # the others, so neither takes CPU time from the other.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = args.pin and len(cpus) >= 2
    with _fake_vendor(cpus[-1] if pin else None) as url:
        if pin:
            os.sched_setaffinity(0, set(cpus[:-1]))
        print(f"fake vendor at {url}; CPUs: client {cpus[:-1] if pin else cpus or '?'}", flush=True)
        rounds = asyncio.run(_measure(url, args))
    _report(rounds, args.concurrency)


if __name__ == "__main__":
    main()
