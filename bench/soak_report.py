"""The soak's figures (``soak.json``) and its section of ``benchmarks.md``.

``python -m bench.soak`` writes both: the JSON, and the section spliced between its
markers into an existing ``benchmarks.md``; ``bench.report`` renders the same section
from ``soak.json`` when it writes the whole file, so either command keeps it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from pydantic import TypeAdapter

SOAK_NAME = "soak.json"
TITLE = "## Soak: one deployment down, the other flaky"
BEGIN = "<!-- soak: written by python -m bench.soak from soak.json; edits here are lost -->"
END = "<!-- end of soak -->"
DOWN, FLAKY = "down", "flaky"


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """What the soak sends, what the vendor does, and how the gateway is set up."""

    rpcs: int
    concurrency: int
    time_limit_s: float
    rpc_deadline_s: float
    inputs_per_rpc: tuple[int, ...]  # cycled over the RPCs
    dims: int
    unavailable: float  # the flaky vendor's share of 503s
    rate_limited: float  # and of 429s
    retry_after: str  # the 429s' Retry-After
    seed: int
    max_retries: int
    retry_backoff_s: float
    retry_backoff_max_s: float
    breaker_failures: int
    breaker_open_s: float
    tolerance: float  # the largest difference allowed per vector value


@dataclass(frozen=True, slots=True)
class Check:
    rule: str
    passed: bool
    measured: str


@dataclass(frozen=True, slots=True)
class SoakResult:
    date: str
    commit: str
    uncommitted_changes: bool
    cores: int  # the CPU cores the run could use
    plan: SoakPlan
    # The callers' side.
    rpcs_sent: int
    rpcs_ok: int
    rpcs_failed: int
    failure_examples: tuple[str, ...]
    vectors_checked: int
    vectors_wrong: int
    largest_difference: float
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    # The flaky vendor's counters.
    vendor_requests: int
    vendor_inputs: int
    vendor_unavailable: int
    vendor_rate_limited: int
    # The gateway's /metrics: attempts by deployment and outcome, breaker transitions by
    # deployment and the state entered, each breaker's state at the end.
    attempts: dict[str, dict[str, int]]
    transitions: dict[str, dict[str, int]]
    breaker_states: dict[str, str]
    gateway_error_lines: int
    checks: tuple[Check, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def attempts_at(self, deployment: str) -> int:
        return sum(self.attempts.get(deployment, {}).values())

    @property
    def probes(self) -> int:
        """Attempts at ``down`` while its breaker was half-open: one per half-open."""
        return self.transitions.get(DOWN, {}).get("half_open", 0)

    @property
    def vendor_requests_per_rpc(self) -> float:
        return self.vendor_requests / self.rpcs_sent if self.rpcs_sent else 0.0

    @property
    def attempts_per_rpc(self) -> float:
        total = self.attempts_at(DOWN) + self.attempts_at(FLAKY)
        return total / self.rpcs_sent if self.rpcs_sent else 0.0


def write_json(result: SoakResult, out: Path) -> Path:
    path = out / SOAK_NAME
    data = asdict(result)
    data["derived"] = {
        "vendor_requests_per_rpc": result.vendor_requests_per_rpc,
        "attempts_per_rpc": result.attempts_per_rpc,
        "down_attempts": result.attempts_at(DOWN),
        "down_probes": result.probes,
        "passed": result.passed,
    }
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def read_json(path: Path) -> SoakResult:
    data = orjson.loads(path.read_bytes())
    data.pop("derived", None)
    return TypeAdapter(SoakResult).validate_python(data)


def read_if_there(out: Path) -> SoakResult | None:
    path = out / SOAK_NAME
    return read_json(path) if path.exists() else None


def _share(value: float) -> str:
    return f"{value * 100:g} %"


def _last_opens(failing: float, window: int = 20) -> float:
    """The chance that nine in ten of ``window`` attempts fail: what opens the breaker
    of the last deployment in service."""
    least = math.ceil(0.9 * window)
    return sum(
        math.comb(window, k) * failing**k * (1 - failing) ** (window - k)
        for k in range(least, window + 1)
    )


def render(result: SoakResult) -> list[str]:
    """The section, its title first; plain Markdown lines."""
    plan = result.plan
    retries = plan.max_retries
    # Every attempt at the flaky deployment fails with this probability, independently.
    fail = plan.unavailable + plan.rate_limited
    all_fail = fail ** (retries + 1)
    cycle = ", ".join(str(n) for n in plan.inputs_per_rpc)
    mean_inputs = sum(plan.inputs_per_rpc) / len(plan.inputs_per_rpc)
    down = result.attempts_at(DOWN)
    before_open = down - result.probes
    flaky_moves = sum(result.transitions.get(FLAKY, {}).values())
    down_moves = result.transitions.get(DOWN, {})
    lines = [
        TITLE,
        "",
        "One model with two deployments of one OpenAI-compatible vendor: `down` points at a "
        "loopback port that is bound but not listening, so every connection to it is "
        "refused; `flaky` is a fake vendor that answers a random "
        f"{_share(plan.unavailable)} of requests 503 and {_share(plan.rate_limited)} 429 "
        f"(`Retry-After: {plan.retry_after}`), and every other request with a vector per "
        "input derived from the input's text. Callers send Embed RPCs and check every "
        "vector. The soak passes only with no failed RPC and every vector in its place.",
        "",
        f"Measured {result.date} on commit `{result.commit}`"
        + (" plus uncommitted changes in the working tree" if result.uncommitted_changes else "")
        + f"; the RPCs took {result.seconds:.1f} s.",
        "",
        "```sh",
        "make soak                         # python -m bench.soak: "
        f"{plan.rpcs:,} RPCs, writes docs/soak.json and this section",
        "python -m bench.soak --rpcs 300   # seconds (the smoke test's mode)",
        "```",
        "",
        "### Setup",
        "",
        "- **Gateway**: `embedgate serve` in its own process, cache off, "
        "`coalesce_wait_ms: 0` (one vendor request per RPC, so the figures below count "
        f"retries, not batching), `max_retries: {retries}`, `retry_backoff_s: "
        f"{plan.retry_backoff_s:g}` (at most {plan.retry_backoff_max_s:g} s), the breaker's "
        f"defaults (`failures: {plan.breaker_failures}`, `open_s: {plan.breaker_open_s:g}`), "
        "`/metrics` on.",
        "- **Vendor** (`bench/flaky_vendor.py`, its own process): one seeded random draw "
        f"per request (seed {plan.seed}) decides 503, 429 or an answer; an answer gives "
        f"each text the unit vector of {plan.dims} float32 values drawn from a generator "
        "seeded by a hash of the text.",
        f"- **Callers**: one grpc.aio channel and the generated stubs, {plan.concurrency} "
        f"RPCs in flight, {plan.rpcs:,} RPCs of {cycle} inputs in turn ({mean_inputs:g} on "
        f"average), every text distinct, a {plan.rpc_deadline_s:g} s deadline each; the "
        f"RPCs stop being sent after {plan.time_limit_s:g} s.",
        "- **Checks**: every RPC returns OK with one embedding per input; each embedding's "
        "`index` is its position and its values are those the vendor derives for the "
        f"input at that position, within {plan.tolerance:g} each (float32 rounding). "
        "Latency is each RPC's, as its caller timed it.",
        "",
        "Why no RPC should fail: the breaker takes `down` out after its first failures and "
        "lets one probe through every `open_s`; a request that meets `down` (at first, or "
        "as a probe) goes on to `flaky` at once, and one that fails at `flaky` tries it "
        "again after its backoff or `Retry-After` (a wait, not an attempt). `flaky` then "
        "is the only deployment, so its breaker needs nine failures in ten of its last 20 "
        "attempts to open (a 429 with `Retry-After` does not count): at "
        f"{_share(plan.unavailable)} failures, a chance of "
        f"{_last_opens(plan.unavailable):.0e} per window of 20. A request fails only when "
        f"every one of its {retries + 1} attempts fails: {fail:.2f}^{retries + 1} = "
        f"{all_fail:.1e} per request at `flaky`, about {all_fail * plan.rpcs:.0e} over "
        f"{plan.rpcs:,} RPCs.",
        "",
        "### Figures",
        "",
        "| RPCs | failed | vectors checked | misplaced or wrong | largest difference "
        "| wall time | RPCs/s | p50 ms | p99 ms | max ms |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| {result.rpcs_sent:,} | **{result.rpcs_failed}** | {result.vectors_checked:,} | "
        f"**{result.vectors_wrong}** | {result.largest_difference:.1e} | "
        f"{result.seconds:.1f} s | {result.rps:,.0f} | {result.p50_ms:.2f} | "
        f"{result.p99_ms:.2f} | {result.max_ms:.2f} |",
        "",
        "| | requests | per RPC | 503 | 429 | answered |",
        "|---|--:|--:|--:|--:|--:|",
        f"| `flaky`, counted by the vendor | {result.vendor_requests:,} | "
        f"{result.vendor_requests_per_rpc:.3f} | {result.vendor_unavailable:,} | "
        f"{result.vendor_rate_limited:,} | "
        f"{result.vendor_requests - result.vendor_unavailable - result.vendor_rate_limited:,} |",
        f"| `down`, attempts counted by the gateway | {down:,} | "
        f"{down / max(1, result.rpcs_sent):.3f} | | | 0 |",
        f"| both | {down + result.attempts_at(FLAKY):,} | {result.attempts_per_rpc:.3f} | | | |",
        "",
        "Attempts by deployment and outcome (`embedgate_deployment_requests_total`): "
        + "; ".join(
            f"`{name}`: "
            + ", ".join(f"{outcome} {count:,}" for outcome, count in sorted(outcomes.items()))
            for name, outcomes in sorted(result.attempts.items())
        )
        + ".",
        "",
        "Breaker transitions (`embedgate_deployment_breaker_transitions_total`): `down` "
        + (", ".join(f"{state} {count}" for state, count in sorted(down_moves.items())) or "none")
        + f"; `flaky` {flaky_moves or 'none'}. At the end: "
        + ", ".join(f"`{name}` {state}" for name, state in sorted(result.breaker_states.items()))
        + ". "
        + f"`down` took {before_open} attempt{'s' if before_open != 1 else ''} before its "
        "breaker opened (the failures that opened it and those already on their way) and "
        f"{result.probes} probe{'s' if result.probes != 1 else ''} after.",
        "",
        f"With {_share(fail)} of `flaky`'s requests failing, a request needs "
        f"1 / (1 - {fail:.2f}) = {1 / (1 - fail):.3f} attempts there on average; measured: "
        f"{result.vendor_requests_per_rpc:.3f} vendor requests per RPC. A 429's "
        "`Retry-After` holds back every request to `flaky`, not only the one that got it "
        "(the deployment waits it out), and the callers, the gateway and the vendor share "
        f"{result.cores} CPU core{'s' if result.cores != 1 else ''}: the RPCs per second "
        "here are no throughput figure to compare with the cases above.",
        "",
        "| check | measured | result |",
        "|---|---|---|",
    ]
    lines += [
        f"| {check.rule} | {check.measured} | {'**passed**' if check.passed else '**failed**'} |"
        for check in result.checks
    ]
    lines.append("")
    if result.failure_examples:
        lines += ["Failed RPCs and wrong vectors (the first few):", ""]
        lines += [f"    {example}" for example in result.failure_examples]
        lines.append("")
    return lines


def section(result: SoakResult) -> str:
    """The section between its markers, ending with a newline."""
    return "\n".join([BEGIN, *render(result), END]) + "\n"


def splice(markdown: str, result: SoakResult) -> str:
    """``markdown`` with the soak section replaced, or put where the report puts it:
    before the profiles, else before the closing analysis, else at the end."""
    text = section(result)
    start, end = markdown.find(BEGIN), markdown.find(END)
    if 0 <= start < end:
        rest = markdown[end + len(END) :].lstrip("\n")
        return markdown[:start] + text + ("\n" + rest if rest else "")
    for heading in ("\n## Profiles\n", "\n## Reading the results\n"):
        at = markdown.find(heading)
        if at >= 0:
            return markdown[: at + 1] + text + "\n" + markdown[at + 1 :]
    return markdown.rstrip("\n") + "\n\n" + text
