"""``python -m bench``: run every case, then write the results, the report and the plot.

``--quick`` is the smoke test's mode: one concurrency, tiny counts, a few seconds,
written wherever ``--out`` says (never over the published ``docs/`` figures unless
asked to). It skips the LiteLLM proxy (an install of minutes) and the local model
(a minute of model loading), and says so in its output and its report.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import cases as bench_cases
from bench import environment
from bench.cases import CASES, Case, CaseResult, Plan, run_cases, skipped
from bench.decode import DecodeResult, measure_decode
from bench.load import h2load_version
from bench.local_model import FULL_LOCAL, LocalResult, measure_local
from bench.procs import REPO, BenchError, Cores, pin_self
from bench.profile import ProfileResult, profile_cases
from bench.results import Results, read_json, write_json
from bench.streams import StreamsPlan, StreamsResult, measure_streams
from bench.targets import TIMES, evaluate

FULL = Plan(
    concurrencies=(1, 16, 64),
    repetitions=3,
    probe_s=1.0,
    measure_s=2.5,
    min_requests=500,
    max_requests=100_000,
)
QUICK = Plan(
    concurrencies=(16,),
    repetitions=1,
    probe_s=0.3,
    measure_s=0.4,
    min_requests=200,
    max_requests=10_000,
)
FULL_STREAMS = StreamsPlan(streams=1000, vendor_latency_s=3.0)
QUICK_STREAMS = StreamsPlan(streams=100, vendor_latency_s=1.0)
QUICK_SKIPS = "skipped in --quick mode (run `python -m bench` to measure it)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for the smoke test")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (default docs/; --quick: build/bench)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="a comma-separated subset of " + ",".join(c.key for c in CASES),
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy profiles of embedgate"
    )
    parser.add_argument(
        "--no-local",
        action="store_true",
        help="skip the embedded model next to sentence-transformers",
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        default=None,
        help="also run cases d0 and d02: case d on the server code of this git revision (the "
        "commit before tracing, to show what tracing off costs)",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        default=None,
        help="rewrite the report and plot from this results file, without measuring",
    )
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="with --report-from: judge the goals again by today's rules (and rewrite "
        "the results file)",
    )
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def chosen_cases(names: str | None) -> list[Case]:
    if names is None:
        return list(CASES)
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = wanted - {case.key for case in CASES}
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    return [case for case in CASES if case.key in wanted]


def describe_level(case: CaseResult) -> None:
    for level in case.levels:
        vendor = level.vendor_requests_per_rpc
        say(
            f"  {case.key:>2} c={level.concurrency:<3} {level.rps:9.0f} RPS  "
            f"p50 {level.p50_ms:7.2f} ms  p99 {level.p99_ms:7.2f} ms  "
            f"CPU {level.cpu_us_per_rpc:6.0f} µs/RPC  "
            f"vendor {'-' if vendor is None else f'{vendor:.3f}'}/RPC  "
            f"RSS {level.peak_rss_mb:.0f} MB"
        )
    if case.error:
        say(f"  {case.key:>2} FAILED: {case.error}")


def measure_cases(
    cases: list[Case], plan: Plan, cores: Cores, work_dir: Path, quick: bool
) -> list[CaseResult]:
    say("cases " + ", ".join(case.key for case in cases) + ", taking turns")
    measured = [
        case
        for case in cases
        if not (quick and case.kind == "litellm")
        and not (case.before and bench_cases.BEFORE is None)
    ]
    by_key = {result.key: result for result in run_cases(measured, plan, cores, work_dir)}
    results = []
    for case in cases:
        why = QUICK_SKIPS if not case.before else "needs --before REV (the commit before tracing)"
        result = by_key.get(case.key) or skipped(case, why)
        say(f"case {case.key}: {case.label}")
        describe_level(result)
        if result.skipped:
            say(f"  {case.key:>2} skipped: {result.skipped}")
        results.append(result)
    return results


def measure_local_model(
    args: argparse.Namespace, cores: Cores, work_dir: Path
) -> tuple[LocalResult | None, str | None]:
    say("the embedded model next to sentence-transformers")
    if args.quick or args.no_local:
        note = QUICK_SKIPS if args.quick else "skipped (--no-local)"
        say(f"  {note}")
        return None, note
    try:
        local = measure_local(FULL_LOCAL, cores, work_dir)
    except BenchError as problem:
        say(f"  FAILED: {problem}")
        return None, f"failed: {problem}"
    for way in (local.reference, local.one_per_call, local.batched, *local.float32):
        ratio = way.against(local.reference)
        say(f"  {way.texts_per_s:7.1f} texts/s  {ratio:.2f}{TIMES}  {way.what}")
    return local, None


def measure_open_streams(
    streams_plan: StreamsPlan, plan: Plan, cores: Cores, work_dir: Path
) -> tuple[StreamsResult | None, str | None]:
    say(f"{streams_plan.streams} open StreamEmbed calls")
    try:
        streams = measure_streams(streams_plan, plan, cores, work_dir)
    except BenchError as problem:
        say(f"  FAILED: {problem}")
        return None, str(problem)
    say(f"  open: {streams.open_rss_mb:.0f} MB, {streams.completed} completed")
    return streams, None


def measure_decode_cost(quick: bool) -> tuple[DecodeResult | None, str | None]:
    say("decode cost")
    try:
        return measure_decode(*((5, 0.2) if quick else (50, 3.0))), None
    except Exception as problem:  # the gateway's own code runs here: say what broke
        say(f"  FAILED: {problem}")
        return None, f"{type(problem).__name__}: {problem}"


def run_all(args: argparse.Namespace) -> Results:
    plan, streams_plan = (QUICK, QUICK_STREAMS) if args.quick else (FULL, FULL_STREAMS)
    started = time.monotonic()
    cores = Cores.detect()
    pin_self(cores.load)
    env = environment.collect(cores, h2load_version())
    profiles: tuple[ProfileResult, ...] = ()
    with tempfile.TemporaryDirectory(prefix="embedgate-bench-") as tmp:
        work_dir = Path(tmp)
        cases = measure_cases(chosen_cases(args.cases), plan, cores, work_dir, args.quick)
        streams, streams_error = measure_open_streams(streams_plan, plan, cores, work_dir)
        local, local_note = measure_local_model(args, cores, work_dir)
        if not args.no_profile and not args.quick:
            say("profiles of embedgate under load (py-spy)")
            profiles = tuple(profile_cases(plan, cores, work_dir))
    decode, decode_error = measure_decode_cost(args.quick)
    targets = evaluate(
        {case.key: case for case in cases},
        streams,
        plan.concurrencies,
        streams_error,
        local,
        local_note,
    )
    return Results(
        environment=env,
        plan=plan,
        streams_plan=streams_plan,
        cases=tuple(cases),
        streams=streams,
        streams_error=streams_error,
        decode=decode,
        decode_error=decode_error,
        profiles=profiles,
        targets=tuple(targets),
        seconds=time.monotonic() - started,
        local=local,
        local_note=local_note,
    )


def rejudged(results: Results) -> Results:
    """``results`` with its goals judged by today's rules."""
    targets = evaluate(
        {case.key: case for case in results.cases},
        results.streams,
        results.plan.concurrencies,
        results.streams_error,
        results.local,
        results.local_note,
    )
    return dataclasses.replace(results, targets=tuple(targets))


def tree_at(revision: str) -> Path:
    """The server and Python client code of ``revision``, unpacked under build/."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", f"{revision}^{{commit}}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError:
        raise BenchError(f"--before: {revision!r} is not a commit of this repository") from None
    tree = REPO / "build" / "bench-before" / commit
    if not (tree / "server").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "server", "clients/python"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out or (REPO / ("build/bench" if args.quick else "docs"))
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    if args.report_from is not None:
        results = read_json(args.report_from)
        if args.rejudge:  # the goals' rules changed since the run: judge them again
            results = rejudged(results)
            written.append(write_json(results, out))
    else:
        try:
            if args.before is not None:
                bench_cases.BEFORE = tree_at(args.before)
            results = run_all(args)
        except BenchError as problem:
            say(f"bench: {problem}")
            return 2
        written.append(write_json(results, out))
    from bench import plot, report  # after the runs: matplotlib is slow to import

    written.append(report.write(results, out, plot_name=plot.NAME))
    written.append(plot.write(results, out))
    say("wrote " + ", ".join(str(path) for path in written if path is not None))
    if args.report_from is None:
        say(f"done in {results.seconds:.0f} s")
    local_failed = (results.local_note or "").startswith("failed")
    failed = any(case.error for case in results.cases) or results.streams_error or local_failed
    return 1 if failed else 0
