"""The performance targets, judged on figures from one run.

Throughput targets are ratios between cases measured side by side, judged at every
concurrency of 16 or more (there every server is saturated; at 1 each RPC waits for
the one before, which the latency targets judge). A target is met only where it is
met at each of them. A target whose case was skipped or failed is not judged, and
says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bench.cases import CaseResult, Level
from bench.local_model import LocalResult
from bench.streams import StreamsResult

TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass(frozen=True, slots=True)
class Check:
    """The target's figure at one concurrency (None: not a per-concurrency figure)."""

    concurrency: int | None
    value: float
    met: bool


@dataclass(frozen=True, slots=True)
class TargetResult:
    key: str
    rule: str
    threshold: float
    at_most: bool  # the figure must stay at or below the threshold (else at or above)
    unit: str
    checks: tuple[Check, ...]
    met: bool | None  # None: a case it needs did not run
    shortfall: str | None = None  # where missed: by how much
    note: str | None = None


def _judged(levels: tuple[int, ...]) -> tuple[int, ...]:
    saturated = tuple(c for c in levels if c >= 16)
    return saturated or levels[-1:]


def _level(result: CaseResult | None, concurrency: int) -> Level | None:
    if result is None:
        return None
    return next((lv for lv in result.levels if lv.concurrency == concurrency), None)


def _format(value: float, unit: str) -> str:
    return f"{value:.2f}{unit}" if unit == TIMES else f"{value:.3g} {unit}"


def _shortfall(checks: tuple[Check, ...], threshold: float, at_most: bool, unit: str) -> str:
    worst = (max if at_most else min)(checks, key=lambda check: check.value)
    where = f" at concurrency {worst.concurrency}" if worst.concurrency is not None else ""
    if at_most:
        excess = worst.value - threshold
        return f"{_format(worst.value, unit)}{where}: {_format(excess, unit)} over the limit"
    missing = 1 - worst.value / threshold
    return f"{_format(worst.value, unit)}{where}: {missing:.0%} short of {_format(threshold, unit)}"


def _finish(
    key: str,
    rule: str,
    threshold: float,
    at_most: bool,
    unit: str,
    checks: list[Check],
    missing: str | None,
) -> TargetResult:
    if missing is not None or not checks:
        return TargetResult(key, rule, threshold, at_most, unit, tuple(checks), None, note=missing)
    met = all(check.met for check in checks)
    shortfall = None if met else _shortfall(tuple(checks), threshold, at_most, unit)
    return TargetResult(key, rule, threshold, at_most, unit, tuple(checks), met, shortfall)


def per_level_target(
    key: str,
    rule: str,
    threshold: float,
    *,
    at_most: bool,
    unit: str,
    cases: Mapping[str, CaseResult],
    needs: tuple[str, ...],
    figure: Callable[[dict[str, Level]], float | None],
    concurrencies: tuple[int, ...],
    unjudged: str = "no figure to judge",
) -> TargetResult:
    skipped = [cases[name] for name in needs if name in cases and cases[name].skipped]
    if skipped:
        why = "; ".join(f"case {case.key} skipped: {case.skipped}" for case in skipped)
        return _finish(key, rule, threshold, at_most, unit, [], why)
    checks: list[Check] = []
    for concurrency in concurrencies:
        levels = {name: _level(cases.get(name), concurrency) for name in needs}
        present = {name: level for name, level in levels.items() if level is not None}
        absent = [name for name in needs if name not in present]
        if absent:
            why = f"case {', '.join(absent)} has no result at concurrency {concurrency}"
            return _finish(key, rule, threshold, at_most, unit, checks, why)
        value = figure(present)
        if value is None:
            return _finish(key, rule, threshold, at_most, unit, checks, unjudged)
        met = value <= threshold if at_most else value >= threshold
        checks.append(Check(concurrency, value, met))
    return _finish(key, rule, threshold, at_most, unit, checks, None)


# Below minus this, d and dw measure the machine's noise, not the access line.
ACCESS_LOG_NOISE_US = 20.0


def _access_log_cost(levels: dict[str, Level]) -> float | None:
    """CPU per RPC of d minus dw; None when dw came out dearer by more than the noise
    allowance (the line cannot cost less than nothing)."""
    difference = levels["d"].cpu_us_per_rpc - levels["dw"].cpu_us_per_rpc
    return None if difference < -ACCESS_LOG_NOISE_US else difference


# Cases that run one code in two server processes: how far apart two processes of the
# same code measure is the resolution of a comparison between two codes.
SECOND_PROCESSES = (("d", "d2"), ("d0", "d02"))


def _pair_cpu(levels: dict[str, Level], first: str, second: str) -> float:
    """CPU per RPC of one code over its two processes (the mean of the two)."""
    return (levels[first].cpu_us_per_rpc + levels[second].cpu_us_per_rpc) / 2


def process_spread(
    cases: Mapping[str, CaseResult], concurrencies: tuple[int, ...]
) -> list[tuple[str, str, int, float]]:
    """For each code run in two processes, at each judged concurrency: CPU per RPC of
    the second process over the first's."""
    spread = []
    for first, second in SECOND_PROCESSES:
        for concurrency in _judged(concurrencies):
            one, other = (
                _level(cases.get(first), concurrency),
                _level(cases.get(second), concurrency),
            )
            if one is not None and other is not None:
                ratio = other.cpu_us_per_rpc / one.cpu_us_per_rpc
                spread.append((first, second, concurrency, ratio))
    return spread


def _inputs_per_vendor_request(level: Level) -> float | None:
    """Each RPC carries one input: inputs per vendor request is RPCs per request."""
    per_rpc = level.vendor_requests_per_rpc
    return None if not per_rpc else 1 / per_rpc


def evaluate(
    cases: Mapping[str, CaseResult],
    streams: StreamsResult | None,
    concurrencies: tuple[int, ...],
    streams_error: str | None = None,
    local: LocalResult | None = None,
    local_note: str | None = None,
) -> list[TargetResult]:
    """The issue's goals, each judged on this run's figures. "Default config" is case d:
    embedgate's defaults but for the cache, off because h2load repeats one text."""
    judged = _judged(concurrencies)
    lowest = concurrencies[:1]
    at_lowest = lowest[0] if lowest else 1

    def ratio(top: str, bottom: str) -> Callable[[dict[str, Level]], float]:
        return lambda lv: lv[top].rps / lv[bottom].rps

    def cpu_ratio(top: str, bottom: str) -> Callable[[dict[str, Level]], float]:
        return lambda lv: lv[top].cpu_us_per_rpc / lv[bottom].cpu_us_per_rpc

    def target(
        key: str,
        rule: str,
        threshold: float,
        needs: tuple[str, ...],
        figure: Callable[[dict[str, Level]], float | None],
        *,
        at_most: bool = False,
        unit: str = TIMES,
        levels: tuple[int, ...] = judged,
        unjudged: str = "no figure to judge",
    ) -> TargetResult:
        return per_level_target(
            key,
            rule,
            threshold,
            at_most=at_most,
            unit=unit,
            cases=cases,
            needs=needs,
            figure=figure,
            concurrencies=levels,
            unjudged=unjudged,
        )

    litellm_levels = tuple(c for c in concurrencies if c == 16) or judged[:1]
    targets = [
        target(
            "added_latency_default",
            f"default config (d), {at_lowest} in flight: p50 added over a direct vendor call "
            "(a) ≤ 1 ms",
            1.0,
            ("d", "a"),
            lambda lv: lv["d"].p50_ms - lv["a"].p50_ms,
            at_most=True,
            unit="ms",
            levels=lowest,
        ),
        target(
            "added_latency_coalescing_off",
            f"coalescing off (c), {at_lowest} in flight: p50 added over a direct vendor call "
            "(a) ≤ 0.8 ms",
            0.8,
            ("c", "a"),
            lambda lv: lv["c"].p50_ms - lv["a"].p50_ms,
            at_most=True,
            unit="ms",
            levels=lowest,
        ),
        target(
            "default_vs_floor",
            f"default config (d): RPS ≥ 0.5{TIMES} the grpc.aio echo floor (b)",
            0.5,
            ("d", "b"),
            ratio("d", "b"),
        ),
        target(
            "default_inputs_per_vendor_request",
            "default config (d): inputs per vendor request ≥ 12 (the vendor takes 16)",
            12.0,
            ("d",),
            lambda lv: _inputs_per_vendor_request(lv["d"]),
            unit="inputs",
        ),
        target(
            "cache_hits_vs_floor",
            f"every RPC a cache hit (e): RPS ≥ 0.75{TIMES} the echo floor (b)",
            0.75,
            ("e", "b"),
            ratio("e", "b"),
        ),
        target(
            "coalescing_off_vs_naive",
            f"coalescing off and cache off (c): RPS ≥ 2{TIMES} the naive grpc.aio + httpx "
            "gateway (n1)",
            2.0,
            ("c", "n1"),
            ratio("c", "n1"),
        ),
        target(
            "default_vs_litellm",
            f"default config (d): RPS ≥ 25{TIMES} the LiteLLM proxy, 1 worker (l), 16 in flight",
            25.0,
            ("d", "l"),
            ratio("d", "l"),
            levels=litellm_levels,
        ),
        target(
            "openai_route_cost",
            f"the OpenAI route (o): CPU per request ≤ 1.5{TIMES} a gRPC Embed's (d)",
            1.5,
            ("o", "d"),
            cpu_ratio("o", "d"),
            at_most=True,
        ),
        target(
            "tracing_off_cost",
            f"tracing off: CPU per RPC of d's code ≤ 1.05{TIMES} the code before tracing's, "
            "two server processes of each (d and d2 against d0 and d02): no measurable cost",
            1.05,
            ("d", "d2", "d0", "d02"),
            lambda lv: _pair_cpu(lv, "d", "d2") / _pair_cpu(lv, "d0", "d02"),
            at_most=True,
        ),
        target(
            "tracing_on_cost",
            f"tracing on, every call sampled and exported (dt): CPU per RPC ≤ 2{TIMES} d's",
            2.0,
            ("dt", "d"),
            cpu_ratio("dt", "d"),
            at_most=True,
        ),
        target(
            "access_log_cost",
            "the access log at the default level: CPU per RPC of d (info) minus dw "
            "(warning) ≤ 20 µs",
            20.0,
            ("d", "dw"),
            _access_log_cost,
            at_most=True,
            unit="µs",
            unjudged=(
                "the case without access lines (dw) cost more CPU per RPC than "
                f"the case with them (d), by over {ACCESS_LOG_NOISE_US:g} µs: on this run the "
                "machine's noise is larger than the line's cost"
            ),
        ),
    ]
    targets += _local_targets(local, local_note)
    targets.append(_streams_target(streams, streams_error))
    return targets


def _local_targets(local: LocalResult | None, note: str | None) -> list[TargetResult]:
    goals = (
        ("local_one_per_call", "one_per_call", 0.9, "1 text per call, 16 in flight"),
        ("local_batched", "batched", 0.95, "32 texts per call"),
    )
    targets = []
    for key, way, threshold, what in goals:
        rule = (
            f"embedded default model, {what}: texts/s ≥ {threshold:g}{TIMES} "
            "sentence-transformers' own encode, batches of 32"
        )
        if local is None:
            targets.append(_finish(key, rule, threshold, False, TIMES, [], note or "not measured"))
            continue
        value = getattr(local, way).against(local.reference)
        check = Check(None, value, value >= threshold)
        targets.append(_finish(key, rule, threshold, False, TIMES, [check], None))
    return targets


def _streams_target(streams: StreamsResult | None, error: str | None) -> TargetResult:
    count = streams.streams if streams is not None else 1000
    rule = f"gateway RSS with {count:,} StreamEmbed calls open ≤ 300 MB"
    if streams is None:
        return _finish("streams_rss", rule, 300.0, True, "MB", [], error or "not measured")
    if not streams.all_open_at_once or streams.completed != streams.streams:
        why = (
            f"{streams.max_inputs_in_flight} of {streams.streams} calls were open at once, "
            f"{streams.completed} completed"
        )
        check = Check(None, streams.open_rss_mb, streams.open_rss_mb <= 300.0)
        return _finish("streams_rss", rule, 300.0, True, "MB", [check], why)
    check = Check(None, streams.open_rss_mb, streams.open_rss_mb <= 300.0)
    return _finish("streams_rss", rule, 300.0, True, "MB", [check], None)
