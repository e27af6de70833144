"""What the figures were measured on: machine, pinning, versions, source revision."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.procs import REPO, Cores

PACKAGES = ("grpcio", "protobuf", "httpx", "aiohttp", "numpy", "orjson", "uvloop")


@dataclass(frozen=True, slots=True)
class Environment:
    date: str
    cpu: str
    cores: int
    memory_gb: float
    kernel: str
    python: str
    h2load: str
    packages: dict[str, str]
    pinning: str
    commit: str
    uncommitted_changes: bool


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=10
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def changed_since_commit(*outputs: str) -> bool:
    """Whether the working tree differs from its commit, not counting ``outputs`` (the
    paths a run writes itself)."""
    excluded = [f":!{path}" for path in outputs]
    return bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded))


def collect(cores: Cores, h2load: str) -> Environment:
    return Environment(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gb=round(memory_gb(), 1),
        kernel=platform.release(),
        python=platform.python_version(),
        h2load=h2load,
        packages={name: package_version(name) for name in PACKAGES},
        pinning=cores.describe(),
        commit=git("rev-parse", "--short", "HEAD") or "unknown",
        # The measured code is the working tree: say when it is not the commit alone
        # (the benchmark's own outputs, rewritten by every run, do not count).
        uncommitted_changes=changed_since_commit("docs/benchmarks.*", "bench/analysis.md"),
    )
