"""The performance targets, judged on figures from one run.

Throughput targets are ratios between cases measured side by side, judged at every
concurrency of 16 or more (there every server is saturated; at 1 each RPC waits for
the one before, which the latency target judges). A target is met only where it is
met at each of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bench.cases import CaseResult, Level
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
) -> TargetResult:
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
            return _finish(key, rule, threshold, at_most, unit, checks, "no figure to judge")
        met = value <= threshold if at_most else value >= threshold
        checks.append(Check(concurrency, value, met))
    return _finish(key, rule, threshold, at_most, unit, checks, None)


def evaluate(
    cases: Mapping[str, CaseResult],
    streams: StreamsResult | None,
    concurrencies: tuple[int, ...],
    streams_error: str | None = None,
) -> list[TargetResult]:
    judged = _judged(concurrencies)
    lowest = concurrencies[:1]

    def ratio(top: str, bottom: str) -> Callable[[dict[str, Level]], float]:
        return lambda lv: lv[top].rps / lv[bottom].rps

    targets = [
        per_level_target(
            "coalescing_off_vs_naive",
            f"embedgate, coalescing off ≥ 2{TIMES} the RPS of the naive httpx gateway (n1)",
            2.0,
            at_most=False,
            unit=TIMES,
            cases=cases,
            needs=("c", "n1"),
            figure=ratio("c", "n1"),
            concurrencies=judged,
        ),
        per_level_target(
            "coalescing_on_vs_floor",
            f"embedgate, coalescing on ≥ 0.5{TIMES} the RPS of the grpc.aio echo floor (b)",
            0.5,
            at_most=False,
            unit=TIMES,
            cases=cases,
            needs=("d", "b"),
            figure=ratio("d", "b"),
            concurrencies=judged,
        ),
        per_level_target(
            "coalescing_on_vendor_requests",
            "embedgate, coalescing on: vendor requests ≤ 1/8 of RPCs (vendor takes 16 per request)",
            1 / 8,
            at_most=True,
            unit="per RPC",
            cases=cases,
            needs=("d",),
            figure=lambda lv: lv["d"].vendor_requests_per_rpc,
            concurrencies=judged,
        ),
        per_level_target(
            "cache_hits_vs_floor",
            f"embedgate, all cache hits ≥ 0.7{TIMES} the RPS of the echo floor (b)",
            0.7,
            at_most=False,
            unit=TIMES,
            cases=cases,
            needs=("e", "b"),
            figure=ratio("e", "b"),
            concurrencies=judged,
        ),
        per_level_target(
            "added_latency",
            f"p50 added at concurrency {lowest[0] if lowest else 1} ≤ 1 ms: "
            "embedgate coalescing off (c) minus a direct vendor call (a)",
            1.0,
            at_most=True,
            unit="ms",
            cases=cases,
            needs=("c", "a"),
            figure=lambda lv: lv["c"].p50_ms - lv["a"].p50_ms,
            concurrencies=lowest,
        ),
    ]
    targets.append(_streams_target(streams, streams_error))
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
