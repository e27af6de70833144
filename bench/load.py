"""Load from ``h2load`` (nghttp2): real gRPC frames over HTTP/2, or JSON over HTTP/1.1.

h2load costs about 10 µs per call, several times less than a Python gRPC client,
so it saturates the server, not itself. It knows nothing of gRPC: the request is a
serialized message behind the 5-byte gRPC length prefix, sent as the body of a POST
with the gRPC headers, and an error status in the trailers still counts as a 200.
That is why every gRPC server is checked with a real gRPC call before it is loaded
(``bench.cases``). h2load prints no percentiles either: they come from its
``--log-file``, one line per request.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from bench.procs import BenchError, pinned

H2LOAD = "h2load"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
JSON_HEADERS = ("content-type: application/json",)


@dataclass(frozen=True, slots=True)
class Target:
    """What h2load sends, and where."""

    url: str
    body: Path
    headers: tuple[str, ...]
    http1: bool


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One h2load run."""

    done: int
    succeeded: int
    failed: int
    errored: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


def h2load_version() -> str:
    if shutil.which(H2LOAD) is None:
        raise BenchError("h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)")
    out = subprocess.run([H2LOAD, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().replace("h2load ", "")


def grpc_frame(message: Message) -> bytes:
    """A gRPC length-prefixed message: not compressed (0), then its size, big-endian."""
    payload = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


def grpc_target(port: int, method: str, message: Message, work_dir: Path) -> Target:
    body = work_dir / f"grpc-{port}.bin"
    body.write_bytes(grpc_frame(message))
    return Target(f"http://127.0.0.1:{port}/{method}", body, GRPC_HEADERS, http1=False)


def http_target(
    port: int,
    path: str,
    json_body: bytes,
    work_dir: Path,
    headers: tuple[str, ...] = JSON_HEADERS,
) -> Target:
    body = work_dir / f"http-{port}.json"
    body.write_bytes(json_body)
    return Target(f"http://127.0.0.1:{port}{path}", body, headers, http1=True)


def h2load_command(
    target: Target,
    concurrency: int,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    log_file: Path | None = None,
) -> list[str]:
    """A run of ``count`` requests, or of ``duration_s`` seconds (count ignored).

    ``concurrency`` requests are kept in flight: over HTTP/2 as streams of one
    connection (what one gRPC channel does), over HTTP/1.1 as that many keep-alive
    connections (HTTP/1.1 has one request in flight per connection)."""
    command = [H2LOAD, "-t", "1", "-d", str(target.body)]
    for header in target.headers:
        command += ["-H", header]
    if target.http1:
        command += ["--h1", "-c", str(concurrency), "-m", "1"]
    else:
        command += ["-c", "1", "-m", str(concurrency)]
    if duration_s is not None:
        command += ["-D", f"{max(1, round(duration_s * 1000))}ms"]
    else:
        command += ["-n", str(count or 1)]
    if log_file is not None:
        command += ["--log-file", str(log_file)]
    return [*command, target.url]


def run_h2load(
    target: Target,
    concurrency: int,
    *,
    core: int | None,
    timeout_s: float,
    count: int | None = None,
    duration_s: float | None = None,
    log_file: Path | None = None,
) -> LoadResult:
    """Run h2load, bounded by ``timeout_s``; raise ``BenchError`` unless every request
    succeeded (at least one, none failed or errored)."""
    command = h2load_command(
        target, concurrency, count=count, duration_s=duration_s, log_file=log_file
    )
    try:
        out = subprocess.run(
            pinned(command, core), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"h2load did not finish within {timeout_s:g} s") from None
    if out.returncode != 0:
        raise BenchError(f"h2load failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    result = parse_summary(out.stdout, log_file)
    if result.succeeded == 0 or result.failed or result.errored:
        raise BenchError(
            f"h2load: {result.succeeded} succeeded, {result.failed} failed, "
            f"{result.errored} errored of {result.done}"
        )
    return result


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored"
)
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_summary(text: str, log_file: Path | None) -> LoadResult:
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    if finished is None or requests is None:
        raise BenchError(f"h2load printed no summary:\n{text[-800:]}")
    seconds = float(finished.group(1)) * _UNIT_S[finished.group(2)]
    done, succeeded, failed, errored = (int(requests.group(i)) for i in (3, 4, 5, 6))
    p50 = p99 = float("nan")
    if log_file is not None:
        p50, p99, failed_rows = latency_percentiles(log_file)
        failed = max(failed, failed_rows)
    return LoadResult(
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        seconds=seconds,
        rps=float(finished.group(3)),
        p50_ms=p50,
        p99_ms=p99,
    )


def latency_percentiles(log_file: Path) -> tuple[float, float, int]:
    """p50 and p99 in ms of the requests in an h2load log (start µs, status, µs taken),
    and how many of them failed (status -1, or not 2xx)."""
    durations: list[int] = []
    failed = 0
    with log_file.open() as rows:
        for row in rows:
            fields = row.split("\t")
            if len(fields) < 3:
                continue
            if not 200 <= int(fields[1]) < 300:
                failed += 1
                continue
            durations.append(int(fields[2]))
    if not durations:
        return float("nan"), float("nan"), failed
    p50, p99 = np.percentile(np.asarray(durations, dtype=np.float64), [50, 99]) / 1000
    return float(p50), float(p99), failed
