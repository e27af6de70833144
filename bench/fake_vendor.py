"""A fast fake of an OpenAI-compatible ``POST /v1/embeddings`` server.

It stands in for the vendor in every benchmark case, so it must never be the
bottleneck: it is a bare ``asyncio.Protocol`` speaking just enough HTTP/1.1
(keep-alive, ``Content-Length`` bodies), on uvloop when it is installed, and every
reply is built once per (inputs, dimensions, encoding) and then sent as stored bytes.
The vectors are the same unit vector for every input: the benchmark measures the
gateway, not the vendor's arithmetic.

``GET /stats`` gives the counters the benchmark reads before and after each run
(requests and inputs received, inputs still waiting for their reply).

Run it as ``python -m bench.fake_vendor --port 0``; it prints ``port N`` once it
listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import orjson

EMBEDDINGS_PATH = "/v1/embeddings"
STATS_PATH = "/stats"
ENCODINGS = ("float", "base64")
# Reads beyond these are a broken client, not a benchmark: drop the connection.
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
# A flat token count per input keeps every reply precomputable.
TOKENS_PER_INPUT = 8

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
REASONS |= {411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests"}
REASONS |= {503: "Service Unavailable"}


@dataclass
class Counters:
    """What the vendor has seen; ``in_flight_inputs`` are received but not yet answered.
    ``requests`` and ``inputs`` count every well-formed embeddings request, including
    those a flaky vendor (``bench.flaky_vendor``) answered with a 503 or a 429."""

    connections: int = 0
    requests: int = 0
    inputs: int = 0
    rejected: int = 0
    in_flight_inputs: int = 0
    max_in_flight_inputs: int = 0
    unavailable: int = 0  # answered 503
    rate_limited: int = 0  # answered 429


def unit_vector(dims: int) -> npt.NDArray[np.float32]:
    """A fixed, finite, unit-length vector of ``dims`` float32 values."""
    vector = np.random.default_rng(dims).standard_normal(dims).astype(np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def embeddings_body(
    vector: npt.NDArray[np.float32], count: int, encoding: str, model: str
) -> bytes:
    """The JSON reply the OpenAI embeddings API gives for ``count`` inputs.

    Float arrays are written with the float32 shortest form (``0.012345679``), the way
    real vendors' replies look, not the 17-digit form of the same value as a double.
    """
    embedding: Any
    if encoding == "base64":
        embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    else:
        embedding = vector
    tokens = TOKENS_PER_INPUT * count
    reply = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": embedding} for i in range(count)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str, param: str | None) -> bytes:
    """An OpenAI-style error object."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return orjson.dumps({"error": error})


def http_response(
    status: int, body: bytes, *, close: bool = False, headers: Mapping[str, str] | None = None
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
    )
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode("ascii") + b"\r\n" + body


class BadRequest(Exception):  # noqa: N818 - a 400 reply, not a failure of the fake
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class EmbeddingsCall:
    """What an accepted embeddings request asked for."""

    model: str
    count: int
    dims: int
    encoding: str


class FakeVendor:
    """The vendor's behaviour, apart from the wire: checks, replies, counters."""

    def __init__(self, *, dims: int, max_inputs: int, latency_s: float) -> None:
        self.dims = dims
        self.max_inputs = max_inputs
        self.latency_s = latency_s
        self.counters = Counters()
        self._vectors: dict[int, npt.NDArray[np.float32]] = {}
        self._replies: dict[EmbeddingsCall, bytes] = {}

    def parse(self, body: bytes) -> EmbeddingsCall:
        """Check a request body as the OpenAI API does; raise ``BadRequest`` if wrong."""
        return self.parse_with_texts(body)[0]

    def parse_with_texts(self, body: bytes) -> tuple[EmbeddingsCall, list[str]]:
        """``parse``, and the texts to embed, in their order."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        texts = request.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("input must be a string or a non-empty array of strings", "input")
        if len(texts) > self.max_inputs:
            raise BadRequest(
                f"too many inputs: {len(texts)}; at most {self.max_inputs} per request", "input"
            )
        encoding = request.get("encoding_format") or "float"
        if encoding not in ENCODINGS:
            raise BadRequest("encoding_format must be 'float' or 'base64'", "encoding_format")
        dims = request.get("dimensions", self.dims)
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= self.dims:
            raise BadRequest(f"dimensions must be an integer from 1 to {self.dims}", "dimensions")
        return EmbeddingsCall(model, len(texts), dims, encoding), texts

    def reply(self, call: EmbeddingsCall) -> bytes:
        """The whole HTTP response for ``call``, built on first use and then reused."""
        response = self._replies.get(call)
        if response is None:
            vector = self._vectors.get(call.dims)
            if vector is None:
                vector = self._vectors[call.dims] = unit_vector(call.dims)
            body = embeddings_body(vector, call.count, call.encoding, call.model)
            response = self._replies[call] = http_response(200, body)
        return response

    def answer(self, body: bytes) -> tuple[bytes, int]:
        """The whole HTTP response to an embeddings request body, and how many inputs
        it answers; raises ``BadRequest``."""
        call = self.parse(body)
        self.counters.requests += 1
        self.counters.inputs += call.count
        return self.reply(call), call.count

    def stats(self) -> bytes:
        return orjson.dumps(asdict(self.counters))


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    length: int
    close: bool


def parse_head(head: bytes) -> RequestHead:
    """The request line and the two headers the fake cares about.

    Raises ``ValueError`` for what it does not speak (chunked bodies, garbage)."""
    lines = head.decode("latin-1").split("\r\n")
    method, path, version = lines[0].split(" ", 2)
    length = 0
    close = version == "HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
        elif name == "transfer-encoding":
            raise ValueError("chunked request bodies are not supported")
    if not 0 <= length <= MAX_BODY_BYTES:
        raise ValueError("bad content-length")
    return RequestHead(method, path.split("?", 1)[0], length, close)


class VendorConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection. Requests are answered one at a time, in
    order: a pipelined request waits in the buffer until the previous reply is sent."""

    def __init__(self, vendor: FakeVendor) -> None:
        self._vendor = vendor
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = cast(asyncio.Transport, transport)
        self._vendor.counters.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self._busy and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._transport.close()
                return
            try:
                head = parse_head(bytes(self._buffer[:end]))
            except (ValueError, UnicodeDecodeError):
                self._reject(411, BadRequest("bad request head"), True)
                return
            start = end + 4
            if len(self._buffer) < start + head.length:
                return
            body = bytes(self._buffer[start : start + head.length])
            del self._buffer[: start + head.length]
            self._handle(head, body)

    def _handle(self, head: RequestHead, body: bytes) -> None:
        vendor = self._vendor
        if head.path == STATS_PATH and head.method == "GET":
            self._send(http_response(200, vendor.stats(), close=head.close), 0, head.close)
            return
        if head.path != EMBEDDINGS_PATH:
            self._reject(404, BadRequest("no such path"), head.close)
            return
        if head.method != "POST":
            self._reject(405, BadRequest("use POST"), head.close)
            return
        try:
            reply, inputs = vendor.answer(body)
        except BadRequest as problem:
            vendor.counters.rejected += 1
            self._reject(400, problem, head.close)
            return
        counters = vendor.counters
        counters.in_flight_inputs += inputs
        counters.max_in_flight_inputs = max(
            counters.max_in_flight_inputs, counters.in_flight_inputs
        )
        if head.close:
            reply = reply.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        if vendor.latency_s > 0:
            # The vendor "computes" on a timer, so thousands of waiting requests cost
            # nothing but a timer handle each.
            self._busy = True
            self._loop.call_later(vendor.latency_s, self._send_late, reply, inputs, head.close)
        else:
            self._send(reply, inputs, head.close)

    def _reject(self, status: int, problem: BadRequest, close: bool) -> None:
        body = error_body(str(problem), problem.param)
        self._send(http_response(status, body, close=close), 0, close)

    def _send(self, reply: bytes, inputs: int, close: bool) -> None:
        self._vendor.counters.in_flight_inputs -= inputs
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if close:
            transport.close()

    def _send_late(self, reply: bytes, inputs: int, close: bool) -> None:
        """The timer's end: reply, then serve what was pipelined meanwhile."""
        self._busy = False
        self._send(reply, inputs, close)
        self._serve_buffered()


def read_stats(port: int, timeout_s: float = 5.0) -> Counters:
    """A running fake's counters (a plain client: no proxy may sit on loopback)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", STATS_PATH)
        reply = connection.getresponse()
        return Counters(**orjson.loads(reply.read()))
    finally:
        connection.close()


async def serve(vendor: FakeVendor, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: VendorConnection(vendor), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"port {bound}", flush=True)  # the parent waits for this line
    async with server:
        await server.serve_forever()


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (a cheaper loop), else on asyncio's own."""
    try:
        import uvloop  # optional: the benchmark works without it
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dims", type=int, default=1024, help="vector size (default 1024)")
    parser.add_argument("--max-inputs", type=int, default=16, help="inputs per request")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every reply")
    args = parser.parse_args(argv)
    vendor = FakeVendor(
        dims=args.dims, max_inputs=args.max_inputs, latency_s=args.latency_ms / 1000
    )
    run_fast(serve(vendor, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
