"""What every loopback vendor fake shares: the HTTP server, faults, recording, replies.

`FakeVendor` is a real aiohttp server on 127.0.0.1. It checks the Bearer key, the route,
the Content-Type and that the body is a JSON object; a subclass (one module per vendor)
says what its vendor's document adds: where the API lives, how a request becomes a `Job`,
what the reply carries besides `data` and `usage`, and what an error looks like. Faults
(status codes, hangs, slow bodies, resets, bad replies) can be queued per request, so the
gateway is tested against the wire, not against mocks.

A normal reply's vector for an item is `fake_vector(item_key(...), size)`, so a test can tell
which vector answers which input. Tokens are counted as characters (`count_tokens`): a
tokenizer-free upper bound, used both for the documented token limits and for `usage`.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

Vector = npt.NDArray[np.float32]
_T = TypeVar("_T")
FaultKind = Literal[
    "status",
    "hang",
    "drip",
    "reset",
    "malformed",
    "wrong_count",
    "shuffled",
    "duplicate_index",
    "nan",
    "wrong_dimension",
    "error_body",
    "delay",
]
# The faults that answer 200 with a well-formed reply whose content is wrong.
DATA_FAULTS = frozenset({"wrong_count", "shuffled", "duplicate_index", "nan", "wrong_dimension"})
DEFAULT_KEY = "test-key"
MAX_TOKENS = 8192  # per input: the CTyun, SCNet and aggregator documents


def fake_vector(key: str, dims: int) -> Vector:
    """The unit vector a fake vendor returns for the item whose `item_key` is `key`."""
    state = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    vector = np.random.default_rng(state).standard_normal(dims).astype(np.float32)
    return vector / np.linalg.norm(vector)


def item_key(
    text: str | None = None, image: str | None = None, video: Sequence[str] | None = None
) -> str:
    """The canonical key of one embedded item as the vendor saw it."""
    parts = []
    if text is not None:
        parts.append("t:" + text)
    if image is not None:
        parts.append("i:" + image)
    if video is not None:
        parts.append("v:" + ",".join(video))
    return "|".join(parts)


def rerank_score(query: str, document: str) -> float:
    """The aggregator fake's relevance score of `document` for `query`, in [0, 1]."""
    dot = float(fake_vector(item_key(text=query), 64) @ fake_vector(item_key(text=document), 64))
    return (1.0 + dot) / 2.0


def count_tokens(text: str) -> int:
    """One token per character: no tokenizer, and never fewer tokens than a real one counts."""
    return len(text)


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour; build it with the class methods."""

    kind: FaultKind
    code: int = 0
    retry_after: str | None = None
    seconds: float = 0.0

    @classmethod
    def status(cls, code: int, retry_after: str | None = None) -> Fault:
        """HTTP `code` with the dialect's error body (and Retry-After if given)."""
        return cls("status", code=code, retry_after=retry_after)

    @classmethod
    def hang(cls) -> Fault:
        """Accept the request and never answer."""
        return cls("hang")

    @classmethod
    def drip(cls, interval_s: float = 0.2) -> Fault:
        """200 and headers at once, then the body one byte per `interval_s`."""
        return cls("drip", seconds=interval_s)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Answer correctly after `seconds`."""
        return cls("delay", seconds=seconds)

    @classmethod
    def reset(cls) -> Fault:
        """Abort the TCP connection without any response."""
        return cls("reset")

    @classmethod
    def malformed(cls) -> Fault:
        """200 with a truncated JSON body."""
        return cls("malformed")

    @classmethod
    def wrong_count(cls) -> Fault:
        """200, one data item missing."""
        return cls("wrong_count")

    @classmethod
    def shuffled(cls) -> Fault:
        """200, data items in reverse order with correct indices (a legal reply)."""
        return cls("shuffled")

    @classmethod
    def duplicate_index(cls) -> Fault:
        """200, two data items with the same index."""
        return cls("duplicate_index")

    @classmethod
    def nan(cls) -> Fault:
        """200, the first vector's first value (or first relevance score) is NaN."""
        return cls("nan")

    @classmethod
    def wrong_dimension(cls) -> Fault:
        """200, the first vector one value short."""
        return cls("wrong_dimension")

    @classmethod
    def error_body(cls) -> Fault:
        """HTTP 200 whose body is the dialect's error object."""
        return cls("error_body")


@dataclass
class Received:
    """One request as the fake got it."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, None if the body was not JSON
    # When it arrived (time.monotonic).
    at: float = field(default_factory=time.monotonic)


class Rejected(Exception):  # noqa: N818 - the vendor rejected the request, not an error here
    """A request the vendor refuses: HTTP `status` with the dialect's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class Job:
    """A validated embeddings request: what to embed and how to encode it."""

    model: str
    keys: tuple[str, ...]
    dims: int
    tokens: int
    base64: bool = False
    scale: float = 1.0


# -- checks the dialects share ----------------------------------------------------------


def is_int(value: object) -> bool:
    """An integer in JSON's sense: `true` is not 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def typed_field(body: dict[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    """`body[name]`, checked to be of `kind` (and non-empty when required)."""
    value = body.get(name)
    if value is None:
        if required:
            raise Rejected(400, f"'{name}' is required", name)
        return None
    if not isinstance(value, kind) or (kind is int and not is_int(value)):
        raise Rejected(400, f"'{name}' must be of type {kind.__name__}", name)
    if required and kind is str and not value:
        raise Rejected(400, f"'{name}' must not be empty", name)
    return value


def string_list(value: object, name: str) -> list[str]:
    """`value`, checked to be a list of strings (the field is `name`)."""
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise Rejected(400, f"'{name}' must be a list of strings", name)
    return value


def text_inputs(body: dict[str, Any], *, max_items: int | None = None) -> list[str]:
    """The OpenAI-style `input`: one string or a non-empty list of strings."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else string_list(value, "input")
    if not texts:
        raise Rejected(400, "'input' must not be empty", "input")
    if max_items is not None and len(texts) > max_items:
        raise Rejected(400, f"'input' has {len(texts)} items, at most {max_items}", "input")
    return texts


def check_tokens(texts: Sequence[str], limit: int = MAX_TOKENS) -> int:
    """The tokens of `texts` in all, refusing any one text over `limit`."""
    counts = [count_tokens(t) for t in texts]
    for i, n in enumerate(counts):
        if n > limit:
            raise Rejected(400, f"input[{i}] has {n} tokens, more than {limit}", "input")
    return sum(counts)


def wants_base64(body: dict[str, Any], name: str, allowed: Sequence[str]) -> bool:
    """True when the request asks for base64 vectors; `allowed[0]` is the default."""
    value = body.get(name, allowed[0])
    if value not in allowed:
        raise Rejected(400, f"'{name}' must be one of {', '.join(allowed)}", name)
    return bool(value == "base64")


# -- error bodies -----------------------------------------------------------------------

OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
}


def error_type(status: int) -> str:
    """The OpenAI-style error `type` of a status with no more specific one."""
    return "invalid_request_error" if status < 500 else "server_error"


def openai_error(problem: Rejected) -> dict[str, Any]:
    """`{"message", "type", "code"}`: the OpenAI error object, before `param`."""
    kind, code = OPENAI_ERRORS.get(problem.status, (error_type(problem.status), None))
    return {"message": problem.message, "type": kind, "code": code}


# -- the server -------------------------------------------------------------------------

# An endpoint: the request, its JSON object body and the data fault to apply, if any.
Route = Callable[[web.Request, dict[str, Any], Fault | None], object]


class FakeVendor(abc.ABC):
    """A loopback HTTP server speaking one vendor's embeddings dialect.

    A vendor's subclass sets the class attributes and implements `parse`; it overrides
    the other hooks where its document differs from the OpenAI shape they default to.
    """

    # Where the API lives: base_url is http://127.0.0.1:<port><base_path>.
    base_path: ClassVar[str] = "/v1"
    # The vector size when the test gives none; 0 where the size depends on the model.
    default_dims: ClassVar[int] = 0
    # The name of the vector in each data[] item.
    vector_field: ClassVar[str] = "embedding"

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_KEY,
        dims: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        self.api_key = api_key  # None: any caller, with or without a key, is accepted
        self.dims_override = dims  # None: the vendor's own size (Qianfan's is the model's)
        self.dims = dims or self.default_dims
        self.max_batch = max_batch
        # Another model's vectors: the same sizes, other values (a different vector
        # space, for the gateway's space check).
        self.space_salt = ""
        self.base_url = ""
        self.received: list[Received] = []
        self.disconnects = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._plan: deque[Fault | None] = deque()
        self._always: Fault | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Cancelling the handler when the client goes away is what makes `disconnects` work.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}{self.base_path}"

    async def close(self) -> None:
        if self._runner is not None:
            self._closing = True
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def plan(self, *faults: Fault | None) -> None:
        """Queue faults: each request pops the next one (None = behave normally)."""
        self._plan.extend(faults)

    def always(self, fault: Fault | None) -> None:
        """Apply `fault` to every request that finds the plan empty."""
        self._always = fault

    def reset(self) -> None:
        """Forget the faults and what was received, as if just started."""
        self.received.clear()
        self._plan.clear()
        self._always = None
        self.disconnects = 0
        self.max_in_flight = self.in_flight  # in_flight is live: requests still running count

    # -- what a vendor's subclass says ---------------------------------------------------

    def routes(self) -> dict[str, Route]:
        """The POST endpoints under `base_path`, each with its handler."""
        return {"/embeddings": self.embeddings}

    @abc.abstractmethod
    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        """Validate an embeddings request by the vendor's document (or raise Rejected)."""

    def usage_fields(self) -> dict[str, Any]:
        """What the embeddings reply's `usage` carries besides prompt and total tokens."""
        return {}

    def reply_fields(self, job: Job, body: dict[str, Any]) -> dict[str, Any]:
        """What the embeddings reply carries besides object, data, model and usage."""
        return {}

    def error(self, problem: Rejected, body: object) -> dict[str, Any]:
        """The dialect's error body for `problem` (the request `body` may be echoed)."""
        return {"error": openai_error(problem)}

    def in_band_error(self, body: object) -> dict[str, Any]:
        """What the `error_body` fault sends with HTTP 200: the error body of a 500."""
        return self.error(Rejected(500, "internal error reported with HTTP 200"), body)

    # -- serving ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._serve(request)
        except asyncio.CancelledError:
            if not self._closing and not request.get(_RESET):
                self.disconnects += 1
            raise
        finally:
            self.in_flight -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.path, headers, body))
        fault = self._plan.popleft() if self._plan else self._always
        kind = fault.kind if fault else None
        if fault is not None and kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            message = {429: "rate limited"}.get(fault.code, f"injected HTTP {fault.code}")
            message = "internal error" if fault.code >= 500 else message
            return self._json(self.error(Rejected(fault.code, message), body), fault.code, extra)
        if kind == "reset":
            assert request.transport is not None
            request[_RESET] = True  # the cancellation that follows is ours, not the client's
            request.transport.abort()
            await asyncio.Event().wait()
        if kind == "hang":
            await asyncio.Event().wait()
        if kind == "malformed":
            return web.Response(body=b'{"object": "list", "data": [{"index": 0, "embed', **_CT)
        if kind == "error_body":
            return self._json(self.in_band_error(body), 200)
        if fault is not None and kind == "delay":
            await asyncio.sleep(fault.seconds)
        try:
            payload = self._answer(request, body, fault if kind in DATA_FAULTS else None)
            status = 200
        except Rejected as problem:
            payload, status = self.error(problem, body), problem.status
        # orjson writes NaN as null; the nan fault needs the bare NaN token json writes.
        data = json.dumps(payload).encode() if kind == "nan" else orjson.dumps(payload)
        if fault is not None and kind == "drip":
            return await self._drip(request, data, status, fault.seconds)
        return web.Response(body=data, status=status, **_CT)

    @staticmethod
    def _json(payload: object, status: int, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=orjson.dumps(payload), status=status, headers=headers, **_CT)

    @staticmethod
    async def _drip(
        request: web.Request, data: bytes, status: int, interval: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status)
        response.content_type = "application/json"
        response.content_length = len(data)
        await response.prepare(request)
        for i in range(len(data)):
            try:
                await response.write(data[i : i + 1])
            except ConnectionError as exc:  # went away between two bytes
                raise asyncio.CancelledError from exc
            await asyncio.sleep(interval)
        await response.write_eof()
        return response

    def _answer(self, request: web.Request, body: Any, fault: Fault | None) -> object:
        """The normal reply (or raise Rejected): auth, then the route and its own rules."""
        if (
            self.api_key is not None
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            raise Rejected(401, "invalid API key")
        route = self.routes().get(request.path.removeprefix(self.base_path))
        if request.method != "POST" or route is None:
            raise Rejected(404, f"no such endpoint: {request.method} {request.path}")
        if request.content_type != "application/json":
            raise Rejected(400, "Content-Type must be application/json")
        if not isinstance(body, dict):
            raise Rejected(400, "the body must be a JSON object")
        return route(request, body, fault)

    # -- the embeddings endpoint --------------------------------------------------------

    def embeddings(
        self, request: web.Request, body: dict[str, Any], fault: Fault | None
    ) -> dict[str, Any]:
        """`/embeddings`: one vector per item of the parsed job, spoiled by a data fault."""
        job = self.parse(request, body)
        if self.max_batch is not None and len(job.keys) > self.max_batch:
            raise Rejected(400, f"'input' has {len(job.keys)} items, at most {self.max_batch}")
        rows = [
            (i, fake_vector(self.space_salt + k, job.dims) * np.float32(job.scale))
            for i, k in enumerate(job.keys)
        ]
        rows = spoil(rows, fault)
        if fault is not None and fault.kind == "nan" and rows:
            rows[0][1][0] = np.nan
        if fault is not None and fault.kind == "wrong_dimension" and rows:
            rows[0] = (rows[0][0], rows[0][1][:-1])
        data = [
            {"object": "embedding", "index": i, self.vector_field: _encode(v, job.base64)}
            for i, v in rows
        ]
        usage: dict[str, Any] = {"prompt_tokens": job.tokens, "total_tokens": job.tokens}
        usage |= self.usage_fields()
        reply: dict[str, Any] = {"object": "list", "data": data, "model": job.model, "usage": usage}
        return reply | self.reply_fields(job, body)


_CT: dict[str, Any] = {"content_type": "application/json"}
_RESET = web.RequestKey("fake_vendor_reset", bool)


def spoil(rows: list[tuple[int, _T]], fault: Fault | None) -> list[tuple[int, _T]]:
    """Apply the data faults that concern the rows' count, order and indices."""
    kind = fault.kind if fault else None
    if kind == "wrong_count":
        return rows[:-1]
    if kind == "shuffled":
        return rows[::-1]
    if kind == "duplicate_index":
        if len(rows) < 2:
            return rows + rows
        return [rows[0], (rows[0][0], rows[1][1]), *rows[2:]]
    return rows


def _encode(vector: Vector, as_base64: bool) -> list[float] | str:
    if as_base64:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector.tolist()]
