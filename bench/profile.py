"""Where embedgate spends its CPU under load: py-spy profiles of the gateway.

Each profiled case is started afresh and loaded with h2load at the highest
concurrency while ``py-spy record --gil`` samples the thread holding the GIL (the
Python work; grpc's C threads do not show). These runs are separate from the
measured ones: sampling slows the process it samples. Frames are counted once per
sample: ``self`` where the sample was taken in the function itself, ``total``
where the function was anywhere on the stack.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.cases import CASES, Plan, deployed
from bench.load import h2load_command
from bench.procs import BenchError, Cores, pinned

# The naive httpx gateway too: what embedgate adds shows against it.
PROFILED = ("n1", "c", "d", "e")
SECONDS = 6
RATE_HZ = 200
TOP = 12


@dataclass(frozen=True, slots=True)
class Hotspot:
    function: str  # "name (module path:first line)"
    self_pct: float
    total_pct: float


@dataclass(frozen=True, slots=True)
class ProfileResult:
    case: str
    concurrency: int
    samples: int
    by_package: tuple[tuple[str, float], ...] = ()  # self time per package, in %
    by_self: tuple[Hotspot, ...] = ()
    embedgate_by_total: tuple[Hotspot, ...] = ()
    error: str | None = None


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def short_frame(frame: str) -> str:
    """``fn (/long/path/site-packages/grpc/aio/_server.py:10)`` → ``fn (grpc/aio/_server.py:10)``;
    no path outside the project is kept."""
    name, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/server/embedgate/", "/bench/"):
        if marker in where:
            kept = where.split(marker, 1)[1]
            prefix = {"/server/embedgate/": "embedgate/", "/bench/": "bench/"}.get(marker, "")
            return f"{name} ({prefix}{kept})"
    if "/lib/python3" in where:
        return f"{name} (stdlib {where.rsplit('/', 1)[-1]})"
    return f"{name} ({where.rsplit('/', 1)[-1]})"


def package_of(frame: str) -> str:
    """The package a shortened frame belongs to: ``httpx``, ``embedgate``, ``asyncio``..."""
    if frame.startswith("Handle._run ("):
        # Self time of a loop callback is C code it calls without a Python frame:
        # grpc's Cython layer and asyncio's C task steps.
        return "C code run by the event loop (grpc's Cython layer, task steps)"
    where = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if where.startswith("stdlib "):
        return "asyncio" if where.removeprefix("stdlib ") in ASYNCIO_FILES else "stdlib, other"
    if "/" not in where:  # <frozen ...>, <string>
        return "stdlib, other"
    return where.split("/", 1)[0]


ASYNCIO_FILES = frozenset(
    f"{name}.py"
    for name in ("events", "base_events", "tasks", "futures", "timeouts", "locks", "runners")
)


def summarize(raw: str) -> tuple[int, list[tuple[str, float]], list[Hotspot], list[Hotspot]]:
    """Samples, self time per package, the top functions by self time, and embedgate's
    top functions by total time."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    if samples == 0:
        return 0, [], [], []
    packages: Counter[str] = Counter()
    for function, count in own.items():
        packages[package_of(function)] += count
    by_package = [(name, 100 * count / samples) for name, count in packages.most_common(TOP)]

    def hotspot(function: str) -> Hotspot:
        return Hotspot(function, 100 * own[function] / samples, 100 * anywhere[function] / samples)

    by_self = [hotspot(function) for function, _ in own.most_common(TOP)]
    ours = [f for f, _ in anywhere.most_common() if "(embedgate/server/" in f]
    return samples, by_package, by_self, [hotspot(function) for function in ours[:TOP]]


def profile_cases(plan: Plan, cores: Cores, work_dir: Path) -> list[ProfileResult]:
    tool = py_spy()
    concurrency = plan.concurrencies[-1]
    results = []
    for case in (c for c in CASES if c.key in PROFILED):
        if tool is None:
            results.append(ProfileResult(case.key, concurrency, 0, error="py-spy not installed"))
            continue
        try:
            results.append(_profile(tool, case.key, plan, cores, work_dir, concurrency))
        except (BenchError, OSError, subprocess.SubprocessError) as problem:
            results.append(ProfileResult(case.key, concurrency, 0, error=str(problem)))
    return results


def _profile(
    tool: str, key: str, plan: Plan, cores: Cores, work_dir: Path, concurrency: int
) -> ProfileResult:
    case = next(c for c in CASES if c.key == key)
    raw_file = work_dir / f"profile-{key}.txt"
    with deployed(case, plan, cores, work_dir) as deployment:
        deployment.check()
        load = subprocess.Popen(
            pinned(
                h2load_command(deployment.target, concurrency, duration_s=SECONDS + 2), cores.load
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            record = [tool, "record", "-p", str(deployment.server.pid), "-d", str(SECONDS)]
            record += ["-r", str(RATE_HZ), "--gil", "--function", "--full-filenames"]
            record += ["-f", "raw", "-o", str(raw_file)]
            done = subprocess.run(
                pinned(record, cores.load),
                capture_output=True,
                text=True,
                timeout=SECONDS + 30,
                check=False,
            )
        finally:
            load.wait(timeout=SECONDS + 30)
    if done.returncode != 0 or not raw_file.exists():
        raise BenchError(f"py-spy failed: {done.stderr.strip()[-300:]}")
    samples, by_package, by_self, ours = summarize(raw_file.read_text())
    return ProfileResult(key, concurrency, samples, tuple(by_package), tuple(by_self), tuple(ours))
