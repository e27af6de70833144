"""``benchmarks.png``: requests per second by case and concurrency (matplotlib, Agg).

matplotlib is a benchmark requirement, not a test one: without it the plot is
skipped and the rest of the run stands.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from bench.results import Results

NAME = "benchmarks.png"


def write(results: Results, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render straight to a file
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [case for case in results.cases if case.levels]
    concurrencies = results.plan.concurrencies
    width = 0.8 / max(1, len(concurrencies))
    figure, axes = plt.subplots(figsize=(11, 5.5), dpi=110)
    for slot, concurrency in enumerate(concurrencies):
        heights = []
        for case in cases:
            level = next((lv for lv in case.levels if lv.concurrency == concurrency), None)
            heights.append(level.rps if level is not None else 0.0)
        positions = [n + (slot - (len(concurrencies) - 1) / 2) * width for n in range(len(cases))]
        bars = axes.bar(positions, heights, width, label=f"concurrency {concurrency}")
        axes.bar_label(bars, labels=[f"{h:,.0f}" for h in heights], fontsize=7, rotation=90)
    axes.set_xticks(range(len(cases)))
    labels = [f"{case.key}\n" + "\n".join(textwrap.wrap(case.label, 18)) for case in cases]
    axes.set_xticklabels(labels, fontsize=7)
    # The direct vendor call is tens of times faster than any gRPC case: a log scale
    # keeps the gRPC cases readable.
    axes.set_yscale("log")
    axes.set_ylabel("requests per second (median, log scale)")
    axes.set_title(
        f"One text per RPC, {results.plan.dims} dimensions; server pinned to one core "
        f"({results.environment.date})",
        fontsize=9,
    )
    axes.margins(y=0.25)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = out / NAME
    figure.savefig(path)
    plt.close(figure)
    return path
