"""The benchmark (``bench/``) in its quick mode: it runs end to end, in seconds, and
measures every case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = ("a", "b", "n1", "n2", "c", "d", "e")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    # scripts/setup test installs it: a machine without it fails here, never skips.
    assert shutil.which("h2load"), "h2load is missing (Debian package nghttp2-client)"
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "benchmarks.json").read_text())
    return out, results


def _levels(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {case["key"]: case["levels"] for case in results["cases"]}


def test_every_case_is_measured_without_failures(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """Every case has a result at the quick mode's concurrency, with requests per
    second above zero, no failed request and no error."""
    _, results = quick_run
    levels = _levels(results)
    assert sorted(levels) == sorted(CASES)
    for case in results["cases"]:
        assert case["error"] is None, (case["key"], case["error"])
        assert case["levels"], case["key"]
        for level in case["levels"]:
            assert level["rps"] > 0, case["key"]
            assert level["rpcs"] > 0, case["key"]
            assert level["failed"] == 0, case["key"]


def test_coalescing_makes_fewer_vendor_requests_than_rpcs(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """With coalescing on, concurrent RPCs share vendor requests: the fake vendor
    counts fewer requests than there were RPCs."""
    _, results = quick_run
    for level in _levels(results)["d"]:
        assert 0 < level["vendor_requests_per_rpc"] < 1


def test_results_and_report_go_to_the_output_directory(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """The quick run writes its results and report where it is told, with every target
    listed, and the open-streams measurement completes every call."""
    out, results = quick_run
    assert (out / "benchmarks.md").read_text().startswith("# Benchmarks")
    assert {target["key"] for target in results["targets"]} >= {
        "coalescing_off_vs_naive",
        "coalescing_on_vs_floor",
        "coalescing_on_vendor_requests",
        "cache_hits_vs_floor",
        "added_latency",
        "streams_rss",
    }
    streams = results["streams"]
    assert streams is not None, results["streams_error"]
    assert streams["completed"] == streams["streams"]
