"""The soak's vendor: an OpenAI-compatible ``POST /v1/embeddings`` server that gives each
input its own vector and fails a random share of requests.

Each text's vector is derived from the text alone (``text_vector``), so whoever sent it
can check that every vector came back for its own input, in its place. Each embeddings
request draws once from a seeded random generator: with probability ``--unavailable`` it
is answered 503, with probability ``--rate-limited`` 429 with ``Retry-After``, else 200.
The draws are independent per request, in the order requests arrive; the seed makes the
sequence of answers reproducible (which request gets which depends on arrival order).

It shares the wire code and the ``GET /stats`` counters of ``bench.fake_vendor``; the
counters add the 503s and 429s it served. Run it as ``python -m bench.flaky_vendor
--port 0``; it prints ``port N`` once it listens.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import random
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from bench.fake_vendor import (
    TOKENS_PER_INPUT,
    FakeVendor,
    http_response,
    run_fast,
    serve,
)


def text_vector(text: str, dims: int) -> npt.NDArray[np.float32]:
    """The unit vector of ``dims`` float32 values this vendor gives ``text``: a
    Gaussian draw seeded by a hash of the text (the same on every machine and run)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    vector = np.random.default_rng(seed).standard_normal(dims)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def fault_body(message: str, kind: str, code: str) -> bytes:
    """An OpenAI-style error object."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


class FlakyVendor(FakeVendor):
    """Per-input vectors, and a seeded draw per request: 503, 429 or an answer."""

    def __init__(
        self,
        *,
        dims: int,
        max_inputs: int,
        latency_s: float,
        unavailable: float,
        rate_limited: float,
        retry_after: str,
        seed: int,
    ) -> None:
        if min(unavailable, rate_limited) < 0 or unavailable + rate_limited > 1:
            raise ValueError("the failure shares must be from 0 to 1, and at most 1 together")
        super().__init__(dims=dims, max_inputs=max_inputs, latency_s=latency_s)
        self.unavailable = unavailable
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self._draw = random.Random(seed)  # noqa: S311 - a reproducible fault pattern
        self._unavailable_reply = http_response(
            503, fault_body("the engine is overloaded", "server_error", "overloaded")
        )
        self._rate_limited_reply = http_response(
            429,
            fault_body("rate limit reached for requests", "requests", "rate_limit_exceeded"),
            headers={"retry-after": retry_after},
        )

    def answer(self, body: bytes) -> tuple[bytes, int]:
        call, texts = self.parse_with_texts(body)
        counters = self.counters
        counters.requests += 1
        counters.inputs += call.count
        draw = self._draw.random()
        if draw < self.unavailable:
            counters.unavailable += 1
            return self._unavailable_reply, 0
        if draw < self.unavailable + self.rate_limited:
            counters.rate_limited += 1
            return self._rate_limited_reply, 0
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector = text_vector(text, call.dims)
            embedding: Any = vector
            if call.encoding == "base64":
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = TOKENS_PER_INPUT * call.count
        reply = {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        body = orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)
        return http_response(200, body), call.count


def share(value: str) -> float:
    """A share of requests, from 0 to 1."""
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a share from 0 to 1")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dims", type=int, default=64, help="vector size (default 64)")
    parser.add_argument("--max-inputs", type=int, default=16, help="inputs per request")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every reply")
    parser.add_argument(
        "--unavailable", type=share, default=0.10, help="share answered 503 (default 0.10)"
    )
    parser.add_argument(
        "--rate-limited", type=share, default=0.02, help="share answered 429 (default 0.02)"
    )
    parser.add_argument(
        "--retry-after", default="0", help="the 429s' Retry-After header (default 0)"
    )
    parser.add_argument("--seed", type=int, default=13, help="of the fault draws (default 13)")
    args = parser.parse_args(argv)
    try:
        vendor = FlakyVendor(
            dims=args.dims,
            max_inputs=args.max_inputs,
            latency_s=args.latency_ms / 1000,
            unavailable=args.unavailable,
            rate_limited=args.rate_limited,
            retry_after=args.retry_after,
            seed=args.seed,
        )
    except ValueError as problem:
        parser.error(str(problem))
    run_fast(serve(vendor, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
