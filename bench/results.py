"""Everything one run measured, and its JSON form (``benchmarks.json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter

from bench.cases import CaseResult, Plan
from bench.decode import DecodeResult
from bench.environment import Environment
from bench.local_model import LocalResult
from bench.profile import ProfileResult
from bench.streams import StreamsPlan, StreamsResult
from bench.targets import TargetResult

RESULTS_NAME = "benchmarks.json"


@dataclass(frozen=True, slots=True)
class Results:
    environment: Environment
    plan: Plan
    streams_plan: StreamsPlan
    cases: tuple[CaseResult, ...]
    streams: StreamsResult | None
    streams_error: str | None
    decode: DecodeResult | None
    decode_error: str | None
    profiles: tuple[ProfileResult, ...]
    targets: tuple[TargetResult, ...]
    seconds: float
    # The embedded model next to sentence-transformers; the note says why it is absent.
    local: LocalResult | None = None
    local_note: str | None = None


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be computed) is not JSON: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def write_json(results: Results, out: Path) -> Path:
    path = out / RESULTS_NAME
    data = _finite(asdict(results))
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def read_json(path: Path) -> Results:
    """A run's results back from its JSON, to rewrite the report without re-running."""
    return TypeAdapter(Results).validate_json(path.read_bytes())
