"""What a vendor reply costs to decode, as JSON float arrays and as base64.

The reply is 64 vectors of 4096 values, built by the fake vendor's own reply
builder, and it goes through the gateway's own decode path: ``decode_json`` (orjson)
then the OpenAI-compatible dialect's ``parse_embeddings`` (``parse_data_list``,
``decode_vector``, the size and finiteness checks). The ``json`` module reading the
same float reply is shown for scale: it is what the naive httpx gateway uses.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.fake_vendor import embeddings_body, unit_vector
from embedgate.server.providers.dialect import decode_json
from embedgate.server.providers.openai_compatible import OpenAICompatible, OpenAISettings

VECTORS = 64
DIMS = 4096


@dataclass(frozen=True, slots=True)
class DecodeTiming:
    what: str
    reply_bytes: int
    repetitions: int
    us_per_reply: float  # the median repetition


@dataclass(frozen=True, slots=True)
class DecodeResult:
    vectors: int
    dims: int
    timings: tuple[DecodeTiming, ...]
    json_over_base64: float  # how many times longer the float reply takes


def gateway_decoder(encoding: str) -> Callable[[bytes], object]:
    dialect = OpenAICompatible(
        OpenAISettings(
            name="decode",
            vendor_model="fake-embedding",
            dimensions=DIMS,
            max_batch=VECTORS,
            encoding_format="base64" if encoding == "base64" else "float",
        )
    )

    def decode(body: bytes) -> object:
        return dialect.parse_embeddings(decode_json(body), VECTORS, DIMS).vectors

    return decode


def time_decoder(
    what: str, decode: Callable[[bytes], object], body: bytes, repetitions: int, budget_s: float
) -> DecodeTiming:
    """The median time of up to ``repetitions`` decodes, stopping early (after at least
    three) once ``budget_s`` is spent."""
    decode(body)  # warm caches and lazy imports
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repetitions and (len(samples) < 3 or spent < budget_s):
        started = time.perf_counter()
        decode(body)
        elapsed = time.perf_counter() - started
        samples.append(elapsed)
        spent += elapsed
    return DecodeTiming(what, len(body), len(samples), statistics.median(samples) * 1e6)


def measure_decode(repetitions: int, budget_s: float) -> DecodeResult:
    vector = unit_vector(DIMS)
    floats = embeddings_body(vector, VECTORS, "float", "fake-embedding")
    packed = embeddings_body(vector, VECTORS, "base64", "fake-embedding")
    as_json = time_decoder(
        "JSON floats (orjson + parse_embeddings)",
        gateway_decoder("float"),
        floats,
        repetitions,
        budget_s,
    )
    as_base64 = time_decoder(
        "base64 (orjson + parse_embeddings)",
        gateway_decoder("base64"),
        packed,
        repetitions,
        budget_s,
    )
    stdlib = time_decoder(
        "JSON floats (json module only)", json.loads, floats, repetitions, budget_s
    )
    return DecodeResult(
        vectors=VECTORS,
        dims=DIMS,
        timings=(as_json, as_base64, stdlib),
        json_over_base64=as_json.us_per_reply / as_base64.us_per_reply,
    )
