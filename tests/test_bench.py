"""The benchmark (``bench/``) in its quick mode: it runs end to end, in seconds, and
measures every case but the two it skips, saying so; its report judges every goal; the
soak (``bench/soak.py``) in its small mode: no RPC lost, no vector misplaced, and its
section kept by both commands that write the report."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = ("a", "b", "n1", "n2", "c", "d", "d2", "dw", "o", "dt", "e")
SKIPPED_WHEN_QUICK = ("l",)
# Runs only given the revision to compare with (--before).
SKIPPED_WITHOUT_BEFORE = ("d0", "d02")
GOALS = {
    "added_latency_default",
    "added_latency_coalescing_off",
    "default_vs_floor",
    "default_inputs_per_vendor_request",
    "cache_hits_vs_floor",
    "coalescing_off_vs_naive",
    "default_vs_litellm",
    "access_log_cost",
    "openai_route_cost",
    "tracing_off_cost",
    "tracing_on_cost",
    "local_one_per_call",
    "local_batched",
    "streams_rss",
}


def run_module(module: str, *args: str) -> None:
    """``python -m module args`` from the repository, within a minute; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    # scripts/setup test installs it: a machine without it fails here, never skips.
    assert shutil.which("h2load"), "h2load is missing (Debian package nghttp2-client)"
    out = tmp_path_factory.mktemp("bench")
    run_module("bench", "--quick", "--out", str(out))
    results: dict[str, Any] = json.loads((out / "benchmarks.json").read_text())
    return out, results


def _levels(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {case["key"]: case["levels"] for case in results["cases"]}


def test_every_case_is_measured_without_failures(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """Every case has a result at the quick mode's concurrency, with requests per
    second above zero, no failed request and no error; the LiteLLM case is skipped, and
    so is the case on an earlier revision's code (none was given), each with a note
    that says so."""
    _, results = quick_run
    levels = _levels(results)
    assert sorted(levels) == sorted(CASES + SKIPPED_WHEN_QUICK + SKIPPED_WITHOUT_BEFORE)
    for case in results["cases"]:
        assert case["error"] is None, (case["key"], case["error"])
        if case["key"] in SKIPPED_WHEN_QUICK + SKIPPED_WITHOUT_BEFORE:
            flag = "--quick" if case["key"] in SKIPPED_WHEN_QUICK else "--before"
            assert flag in case["skipped"]
            assert not case["levels"]
            continue
        assert case["skipped"] is None, case["key"]
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
    """The quick run writes its results and report where it is told, with every goal
    listed, and the open-streams measurement completes every call."""
    out, results = quick_run
    assert (out / "benchmarks.md").read_text().startswith("# Benchmarks")
    assert {target["key"] for target in results["targets"]} == GOALS
    streams = results["streams"]
    assert streams is not None, results["streams_error"]
    assert streams["completed"] == streams["streams"]


def _goal_rows(report: str) -> dict[str, str]:
    """The goals table's rows: goal → result cell."""
    table = report.split("| goal | measured | result |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {row[0].lstrip("| "): row[-1].rstrip(" |") for row in rows}


def test_the_report_states_the_log_level_and_judges_every_goal(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """The report says embedgate runs at its default log level; the goals table has a
    row per goal, each met, missed by a stated amount, or not judged with the reason;
    what the quick mode skips (LiteLLM, the local model) it says it skipped."""
    out, results = quick_run
    report = (out / "benchmarks.md").read_text()
    assert "default log level, **info**" in report
    rows = _goal_rows(report)
    assert len(rows) == len(GOALS)
    judged = {target["rule"]: target for target in results["targets"]}
    for rule, verdict in rows.items():
        target = judged[rule]
        if target["met"] is None:
            assert verdict.startswith("not judged: "), verdict
        elif target["met"]:
            assert verdict == "**met**"
        else:
            assert verdict == f"**missed**: {target['shortfall']}"
            assert target["shortfall"]
    litellm = next(t for t in results["targets"] if t["key"] == "default_vs_litellm")
    assert litellm["met"] is None
    assert "skipped in --quick mode" in litellm["note"]
    assert "Case l was not measured: skipped in --quick mode" in report
    assert "## The embedded default model" in report
    assert "Not measured: skipped in --quick mode" in report


def test_the_report_says_how_far_apart_two_processes_of_one_code_measured(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    """d2 runs d's code in a second process; the report gives the ratio of their CPU per
    RPC, from this run's figures, as the resolution of a comparison between codes."""
    out, results = quick_run
    report = (out / "benchmarks.md").read_text()
    (d,), (d2,) = _levels(results)["d"], _levels(results)["d2"]
    ratio = d2["cpu_us_per_rpc"] / d["cpu_us_per_rpc"]
    assert "**Two processes of one code.**" in report
    assert f"d2 over d {ratio:.2f}\N{MULTIPLICATION SIGN} at {d['concurrency']}" in report
    assert "d02 over d0" not in report  # d0 did not run: no figure for it


def test_a_missed_goal_says_by_how_much_and_why(
    quick_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Rewritten from results where goals are missed, the report lists each missed goal
    with its shortfall and the reason written for it in bench/notes.toml (or that none
    is written yet)."""
    results = copy.deepcopy(quick_run[1])
    for target in results["targets"]:
        if target["key"] in ("access_log_cost", "default_inputs_per_vendor_request"):
            target["met"], target["note"] = False, None
            target["shortfall"] = "measured 1: 2 short"
    report = _rewritten(results, tmp_path)
    missed = report.split("### Missed targets: by how much, and why", 1)[1]
    notes = tomllib.loads((REPO / "bench" / "notes.toml").read_text())
    for key in ("access_log_cost", "default_inputs_per_vendor_request"):
        why = " ".join(notes[key].split())
        assert f"measured 1: 2 short. Why: {why}" in missed


def test_litellm_that_cannot_install_is_skipped_with_a_note(
    quick_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Where pip cannot install LiteLLM (here: no package index at all), the install
    raises the note that skips the case, and the report shows it, in the results and
    as the reason its goal is not judged: never a silent omission."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bench.litellm_proxy import UnavailableError, ensure_installed\n"
        "try:\n"
        "    ensure_installed(Path(sys.argv[1]), ('--no-index',))\n"
        "except UnavailableError as problem:\n"
        "    print(problem)\n"
        "else:\n"
        "    sys.exit('installed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "venv")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    note = done.stdout.strip()
    assert "`litellm[proxy]` could not be installed" in note
    assert note.endswith("case skipped")
    results = copy.deepcopy(quick_run[1])
    for case in results["cases"]:
        if case["key"] == "l":
            case["skipped"] = note
    for target in results["targets"]:
        if target["key"] == "default_vs_litellm":
            target["note"] = f"case l skipped: {note}"
    report = _rewritten(results, tmp_path / "report")
    assert f"Case l was not measured: {note}." in report
    assert f"not judged: case l skipped: {note}" in report


def _rewritten(results: dict[str, Any], out: Path) -> str:
    """The report written by ``--report-from`` from ``results``."""
    out.mkdir(parents=True, exist_ok=True)
    source = out / "results.json"
    source.write_text(json.dumps(results))
    run_module("bench", "--report-from", str(source), "--out", str(out))
    return (out / "benchmarks.md").read_text()


SOAK_RPCS = 300
STUB_REPORT = "# Benchmarks\n\n## Decoding a vendor reply\n\nText.\n\n## Profiles\n\nMore.\n"


@pytest.fixture(scope="module")
def soak_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The soak in its small mode, written next to a stand-in report."""
    out = tmp_path_factory.mktemp("soak")
    (out / "benchmarks.md").write_text(STUB_REPORT)
    run_module("bench.soak", "--rpcs", str(SOAK_RPCS), "--out", str(out))
    soak: dict[str, Any] = json.loads((out / "soak.json").read_text())
    return out, soak


def test_the_soak_loses_no_rpc_and_misplaces_no_vector(
    soak_run: tuple[Path, dict[str, Any]],
) -> None:
    """With one deployment refusing connections and the other failing 12 % of its
    requests (503 or 429), every RPC succeeds and every vector is the one the vendor
    derives for the input at its position; the vendor did fail requests, and every one
    of its answers reached a caller."""
    _, soak = soak_run
    cycle = soak["plan"]["inputs_per_rpc"]
    inputs = sum(cycle[index % len(cycle)] for index in range(SOAK_RPCS))
    assert soak["rpcs_sent"] == soak["rpcs_ok"] == SOAK_RPCS
    assert soak["rpcs_failed"] == 0, soak["failure_examples"]
    assert soak["vectors_checked"] == inputs
    assert soak["vectors_wrong"] == 0, soak["failure_examples"]
    # The vendor's first 300 draws (seed 13) hold 27 503s and 8 429s.
    assert soak["vendor_unavailable"] > 0
    assert soak["vendor_rate_limited"] > 0
    flaky = soak["attempts"]["flaky"]
    # No coalescing: one answered vendor request per RPC, the rest retried.
    assert flaky["ok"] == SOAK_RPCS
    assert sum(flaky.values()) == soak["vendor_requests"] > SOAK_RPCS


def test_the_soaks_breakers_take_out_the_dead_deployment_only(
    soak_run: tuple[Path, dict[str, Any]],
) -> None:
    """The breaker of the deployment that refuses connections opens, and after that it
    gets no request but half-open probes (beyond those already on their way); the flaky
    deployment's breaker never leaves closed."""
    _, soak = soak_run
    plan, transitions = soak["plan"], soak["transitions"]
    down = transitions.get("down", {})
    assert down.get("open", 0) >= 1
    assert not any(transitions.get("flaky", {}).values())
    assert soak["breaker_states"] == {"down": "open", "flaky": "closed"}
    attempts = sum(soak["attempts"]["down"].values())
    probes = down.get("half_open", 0)
    # The failures that opened it, and at most one for each other RPC then in flight.
    before = attempts - probes
    assert plan["breaker_failures"] <= before <= plan["breaker_failures"] + plan["concurrency"]
    assert all(check["passed"] for check in soak["checks"])


def test_the_soak_writes_its_section_into_the_report(
    soak_run: tuple[Path, dict[str, Any]],
) -> None:
    """The soak puts its section into an existing report once, before the profiles,
    between its markers, and leaves the rest of the report as it was."""
    out, _ = soak_run
    report = (out / "benchmarks.md").read_text()
    begin, end = report.index("<!-- soak:"), report.index("<!-- end of soak -->")
    assert report.count("## Soak: one deployment down, the other flaky") == 1
    assert report.index("## Decoding a vendor reply") < begin < end < report.index("## Profiles")
    # The section, then the blank line that parts it from the next one.
    outside = report[:begin] + report[end:].split("\n", 2)[2]
    assert outside == STUB_REPORT


def test_the_report_renders_the_soak_section_as_the_soak_does(
    quick_run: tuple[Path, dict[str, Any]],
    soak_run: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """A report rewritten from a run's results keeps the soak's section: rendered from
    the soak.json beside it, the same text the soak wrote, before the closing analysis."""
    bench_out, soak_out = quick_run[0], soak_run[0]
    shutil.copy(soak_out / "soak.json", tmp_path / "soak.json")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--report-from",
            str(bench_out / "benchmarks.json"),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    def section(report: str) -> str:
        begin, end = report.index("<!-- soak:"), report.index("<!-- end of soak -->")
        return report[begin:end]

    rendered = (tmp_path / "benchmarks.md").read_text()
    assert section(rendered) == section((soak_out / "benchmarks.md").read_text())
    assert "## Soak: one deployment down, the other flaky" in section(rendered)
    assert rendered.index("<!-- end of soak -->") < rendered.index("## Reading the results")
