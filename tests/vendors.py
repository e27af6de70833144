"""Loopback fakes of the embedding vendors' HTTP dialects, for the gateway's tests.

Each `FakeVendor` is a real aiohttp server on 127.0.0.1 that speaks one vendor's dialect the
way its document describes it: the URL, the request fields and their limits, the reply shape
and the error body. Faults (status codes, hangs, slow bodies, resets, bad replies) can be
queued per request, so the gateway is tested against the wire, not against mocks.

A normal reply's vector for an item is `fake_vector(item_key(...), size)`, so a test can tell
which vector answers which input. Tokens are counted as characters (`count_tokens`): a
tokenizer-free upper bound, used both for the documented token limits and for `usage`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

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
DATA_FAULTS = frozenset({"wrong_count", "shuffled", "duplicate_index", "nan", "wrong_dimension"})
DIALECTS = ("rzenembed", "ctyun", "scnet", "qianfan", "aggregator", "openai")
DEFAULT_DIMS = {"rzenembed": 2048, "ctyun": 1024, "scnet": 4096, "aggregator": 1024, "openai": 1536}
BASE_PATHS = {"scnet": "/api/llm/v1", "qianfan": "/v2"}  # every other dialect: /v1
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


class Rejected(Exception):  # noqa: N818 - the vendor rejected the request, not an error here
    """A request the vendor refuses: HTTP `status` with the dialect's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class _Job:
    """A validated embeddings request: what to embed and how to encode it."""

    model: str
    keys: tuple[str, ...]
    dims: int
    tokens: int
    base64: bool = False
    scale: float = 1.0
    request_id: str = ""


@dataclass(frozen=True)
class _QianfanModel:
    max_texts: int
    max_chars: int
    dims: int
    multimodal: bool = False


# The Qianfan document's table (token limits need Baidu's tokenizer: only characters are checked).
QIANFAN_MODELS = {
    "embedding-v1": _QianfanModel(16, 1000, 384),
    "bge-large-zh": _QianfanModel(16, 2000, 1024),
    "bge-large-en": _QianfanModel(16, 2000, 1024),
    "tao-8k": _QianfanModel(1, 28000, 1024),
    "gme-qwen2-vl-2b-instruct": _QianfanModel(1, 0, 1536, multimodal=True),
}
RZEN_DIMENSIONS = frozenset({256, 512, 768, 1024, 1536, 2048})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    """`body[name]`, checked to be of `kind` (and non-empty when required)."""
    value = body.get(name)
    if value is None:
        if required:
            raise Rejected(400, f"'{name}' is required", name)
        return None
    if not isinstance(value, kind) or (kind is int and not _is_int(value)):
        raise Rejected(400, f"'{name}' must be of type {kind.__name__}", name)
    if required and kind is str and not value:
        raise Rejected(400, f"'{name}' must not be empty", name)
    return value


def _strings(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise Rejected(400, f"'{name}' must be a list of strings", name)
    return value


def _text_inputs(body: dict[str, Any], *, max_items: int | None = None) -> list[str]:
    """The OpenAI-style `input`: one string or a non-empty list of strings."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else _strings(value, "input")
    if not texts:
        raise Rejected(400, "'input' must not be empty", "input")
    if max_items is not None and len(texts) > max_items:
        raise Rejected(400, f"'input' has {len(texts)} items, at most {max_items}", "input")
    return texts


def _check_tokens(texts: Sequence[str], limit: int = MAX_TOKENS) -> int:
    counts = [count_tokens(t) for t in texts]
    for i, n in enumerate(counts):
        if n > limit:
            raise Rejected(400, f"input[{i}] has {n} tokens, more than {limit}", "input")
    return sum(counts)


def _encoding(body: dict[str, Any], name: str, allowed: Sequence[str]) -> bool:
    """True when the request asks for base64 vectors."""
    value = body.get(name, allowed[0])
    if value not in allowed:
        raise Rejected(400, f"'{name}' must be one of {', '.join(allowed)}", name)
    return bool(value == "base64")


class FakeVendor:
    """A loopback HTTP server speaking one vendor's embeddings dialect."""

    def __init__(
        self,
        dialect: str,
        *,
        api_key: str | None = "test-key",
        dims: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self.api_key = api_key
        self.dims_override = dims
        self.dims = dims or DEFAULT_DIMS.get(dialect, 0)
        self.max_batch = max_batch
        self.ignore_top_n = False
        self.base_url = ""
        self.received: list[Received] = []
        self.disconnects = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._plan: deque[Fault | None] = deque()
        self._always: Fault | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._base_path = BASE_PATHS.get(dialect, "/v1")

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
        self.base_url = f"http://127.0.0.1:{port}{self._base_path}"

    async def close(self) -> None:
        if self._runner is not None:
            self._closing = True
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeVendor:
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
        self.received.clear()
        self._plan.clear()
        self._always = None
        self.ignore_top_n = False
        self.disconnects = 0
        self.max_in_flight = self.in_flight  # in_flight is live: requests still running count

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
            return self._json(self._error(fault.code, message, None, body), fault.code, extra)
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
            if self.dialect == "rzenembed":
                rid = body.get("request_id") if isinstance(body, dict) else None
                error = {
                    "data": [],
                    "message": "model invocation failed",
                    "response_status": 1002,
                    "request_id": rid if isinstance(rid, str) else str(uuid.uuid4()),
                }
            else:
                error = self._error(500, "internal error reported with HTTP 200", None, body)
            return self._json(error, 200)
        if fault is not None and kind == "delay":
            await asyncio.sleep(fault.seconds)
        try:
            payload, status = self._answer(request, body, fault if kind in DATA_FAULTS else None)
        except Rejected as problem:
            payload, status = (
                self._error(problem.status, problem.message, problem, body),
                problem.status,
            )
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

    def _answer(self, request: web.Request, body: Any, fault: Fault | None) -> tuple[object, int]:
        """The normal reply (or raise Rejected): auth, then the dialect's own rules."""
        if (
            self.api_key is not None
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            raise Rejected(401, "invalid API key")
        route = request.path.removeprefix(self._base_path)
        if request.method != "POST" or route not in self._routes():
            raise Rejected(404, f"no such endpoint: {request.method} {request.path}")
        if request.content_type != "application/json":
            raise Rejected(400, "Content-Type must be application/json")
        if not isinstance(body, dict):
            raise Rejected(400, "the body must be a JSON object")
        if route == "/rerank":
            return self._rerank(body, fault), 200
        parse: Callable[[web.Request, dict[str, Any]], _Job] = getattr(self, "_" + self.dialect)
        job = parse(request, body)
        if self.max_batch is not None and len(job.keys) > self.max_batch:
            raise Rejected(400, f"'input' has {len(job.keys)} items, at most {self.max_batch}")
        return self._embeddings(job, fault), 200

    def _routes(self) -> tuple[str, ...]:
        return ("/embeddings", "/rerank") if self.dialect == "aggregator" else ("/embeddings",)

    # -- the dialects: validate a request into a _Job -------------------------------------

    def _rzenembed(self, request: web.Request, body: dict[str, Any]) -> _Job:
        rid = _field(body, "request_id", str) or str(uuid.uuid4())
        if request.headers.get("accept") != "application/json":
            raise Rejected(400, "header 'accept: application/json' is required")
        if body.get("model") != "RzenEmbed":
            raise Rejected(400, "'model' must be RzenEmbed", "model")
        _field(body, "input", list)
        _field(body, "instruction", str)
        dims = _field(body, "dimensions", int)
        if dims is None:
            dims = self.dims
        elif dims not in RZEN_DIMENSIONS:
            raise Rejected(400, "'dimensions' must be one of 256, 512, 768, 1024, 1536, 2048")
        texts, images, video = (
            _strings(body.get(n) or [], n) for n in ("texts", "images", "video")
        )
        if len(texts) > 1:
            raise Rejected(400, f"'texts' has {len(texts)} items, at most 1")
        if len(images) > 1:
            raise Rejected(400, f"'images' has {len(images)} items, at most 1")
        if video and not 2 <= len(video) <= 64:
            raise Rejected(400, f"'video' has {len(video)} frames, needs 2 to 64")
        if not (texts or images or video):
            raise Rejected(400, "one of 'texts', 'images' or 'video' is required")
        key = item_key(texts[0] if texts else None, images[0] if images else None, video or None)
        tokens = sum(map(count_tokens, texts)) + len(images) + len(video)
        return _Job("RzenEmbed", (key,), dims, tokens, request_id=rid)

    def _ctyun(self, request: web.Request, body: dict[str, Any]) -> _Job:
        model = _field(body, "model", str, required=True)
        _field(body, "user", str)
        value = body.get("input")
        if isinstance(value, list) and value and all(_is_int(t) for t in value):
            value = [value]  # one token array
        if isinstance(value, list) and value and all(isinstance(t, list) for t in value):
            if not all(t and all(_is_int(x) for x in t) for t in value):
                raise Rejected(400, "'input' token arrays must be non-empty lists of integers")
            texts = [" ".join(map(str, tokens)) for tokens in value]
            for i, tokens in enumerate(value):
                if len(tokens) > MAX_TOKENS:
                    raise Rejected(400, f"input[{i}] has {len(tokens)} tokens, more than 8192")
            used = sum(len(t) for t in value)
        else:
            texts = _text_inputs(body)
            used = _check_tokens(texts)
        dims = _field(body, "dimensions", int)
        if dims is None:
            dims = self.dims
        elif not model.startswith("text-embedding-3"):
            raise Rejected(400, "'dimensions' is only supported by text-embedding-3 models")
        elif not 1 <= dims <= self.dims:
            raise Rejected(400, f"'dimensions' must be between 1 and {self.dims}")
        b64 = _encoding(body, "encoding_format", ("float", "base64"))
        return _Job(model, tuple(item_key(text=t) for t in texts), dims, used, base64=b64)

    def _scnet(self, request: web.Request, body: dict[str, Any]) -> _Job:
        model = _field(body, "model", str, required=True)
        texts = _text_inputs(body, max_items=5)
        used = _check_tokens(texts)
        for name in ("dimension", "dimensions"):
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if not _is_int(value):
                raise Rejected(400, f"'{name}' must be an integer")
            if value != self.dims:
                raise Rejected(400, f"'{name}' is {self.dims} for {model} and cannot be changed")
        b64 = _encoding(body, "encoding_format", ("float", "base64"))
        return _Job(model, tuple(item_key(text=t) for t in texts), self.dims, used, base64=b64)

    def _qianfan(self, request: web.Request, body: dict[str, Any]) -> _Job:
        model = _field(body, "model", str, required=True)
        spec = QIANFAN_MODELS.get(model.lower())
        if spec is None:
            raise Rejected(404, f"model {model} not found", "model")
        _field(body, "user", str)
        _encoding(body, "encoding_format", ("float",))
        dims = self.dims_override or spec.dims
        value = body.get("input")
        if not isinstance(value, list) or not value:
            raise Rejected(400, "'input' must be a non-empty list", "input")
        if len(value) > spec.max_texts:
            raise Rejected(400, f"'input' has {len(value)} items, at most {spec.max_texts}")
        if spec.multimodal:
            item = value[0]
            if not isinstance(item, dict):
                raise Rejected(400, "input[0] must be an object with 'text' and/or 'image'")
            text, image = item.get("text"), item.get("image")
            given = [v for v in (text, image) if v is not None]
            if not given or not all(isinstance(v, str) and v for v in given):
                raise Rejected(400, "input[0] needs a non-empty 'text' and/or 'image'")
            tokens = count_tokens(text or "") + (image is not None)
            return _Job(model, (item_key(text=text, image=image),), dims, tokens)
        texts = _strings(value, "input")
        for i, text in enumerate(texts):
            if not text:
                raise Rejected(400, f"input[{i}] is an empty string")
            if len(text) > spec.max_chars:
                raise Rejected(
                    400, f"input[{i}] has {len(text)} characters, at most {spec.max_chars}"
                )
        used = sum(map(count_tokens, texts))
        return _Job(model, tuple(item_key(text=t) for t in texts), dims, used)

    def _aggregator(self, request: web.Request, body: dict[str, Any]) -> _Job:
        model = _field(body, "model", str, required=True)
        normalized = _field(body, "normalized", bool, required=True)
        _field(body, "embedding_type", str, required=True)
        b64 = _encoding(body, "embedding_type", ("float", "base64"))
        value = body.get("input")
        if not isinstance(value, list) or not value:
            raise Rejected(400, "'input' must be a non-empty list of objects")
        keys, texts, images = [], [], 0
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise Rejected(400, f"input[{i}] must be an object with 'text' and/or 'image'")
            text, image = item.get("text") or None, item.get("image") or None
            if any(v is not None and not isinstance(v, str) for v in (text, image)):
                raise Rejected(400, f"input[{i}]: 'text' and 'image' must be strings")
            if not (text or image):
                raise Rejected(400, f"input[{i}] needs a non-empty 'text' or 'image'")
            keys.append(item_key(text=text, image=image))
            texts.append(text or "")
            images += image is not None
        used = _check_tokens(texts) + images
        scale = 1.0 if normalized else 2.5
        return _Job(model, tuple(keys), self.dims, used, base64=b64, scale=scale)

    def _openai(self, request: web.Request, body: dict[str, Any]) -> _Job:
        model = _field(body, "model", str, required=True)
        _field(body, "user", str)
        texts = _text_inputs(body)
        for i, text in enumerate(texts):
            if not text:
                raise Rejected(400, f"input[{i}] is an empty string", "input")
        dims = _field(body, "dimensions", int)
        if dims is None:
            dims = self.dims
        elif not 1 <= dims <= self.dims:
            raise Rejected(400, f"'dimensions' must be between 1 and {self.dims}", "dimensions")
        b64 = _encoding(body, "encoding_format", ("float", "base64"))
        used = sum(map(count_tokens, texts))
        return _Job(model, tuple(item_key(text=t) for t in texts), dims, used, base64=b64)

    # -- replies --------------------------------------------------------------------------

    def _embeddings(self, job: _Job, fault: Fault | None) -> dict[str, Any]:
        rows = [
            (i, fake_vector(k, job.dims) * np.float32(job.scale)) for i, k in enumerate(job.keys)
        ]
        rows = _spoil(rows, fault)
        if fault is not None and fault.kind == "nan" and rows:
            rows[0][1][0] = np.nan
        if fault is not None and fault.kind == "wrong_dimension" and rows:
            rows[0] = (rows[0][0], rows[0][1][:-1])
        name = "embeddings" if self.dialect == "ctyun" else "embedding"
        data = [{"object": "embedding", "index": i, name: _encode(v, job.base64)} for i, v in rows]
        usage: dict[str, Any] = {"prompt_tokens": job.tokens, "total_tokens": job.tokens}
        reply: dict[str, Any] = {"object": "list", "data": data, "model": job.model, "usage": usage}
        if self.dialect == "rzenembed":
            reply |= {"message": "success", "response_status": 0, "request_id": job.request_id}
        elif self.dialect == "scnet":
            usage["completion_tokens"] = 0
            for name in ("prompt_tokens_details", "completion_tokens_details"):
                usage[name] = None
            for name in ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens"):
                usage[name] = None
            reply |= {"id": "embd-" + uuid.uuid4().hex, "created": int(time.time())}
        elif self.dialect == "qianfan":
            reply |= {"id": "as-" + uuid.uuid4().hex[:10], "created": int(time.time())}
        return reply

    def _rerank(self, body: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
        _field(body, "model", str, required=True)
        query = _field(body, "query", str, required=True)
        top_n = _field(body, "top_n", int)
        if top_n is not None and top_n < 1:
            raise Rejected(400, "'top_n' must be at least 1", "top_n")
        documents = _strings(body.get("documents"), "documents")
        if not documents:
            raise Rejected(400, "'documents' must not be empty", "documents")
        if self.max_batch is not None and len(documents) > self.max_batch:
            raise Rejected(400, f"'documents' has {len(documents)} items, at most {self.max_batch}")
        scored = sorted(
            ((i, rerank_score(query, d)) for i, d in enumerate(documents)), key=lambda r: -r[1]
        )
        if top_n is not None and not self.ignore_top_n:
            scored = scored[:top_n]
        scored = _spoil(scored, fault)
        if fault is not None and fault.kind == "nan" and scored:
            scored[0] = (scored[0][0], math.nan)
        tokens = count_tokens(query) * len(documents) + sum(map(count_tokens, documents))
        return {
            "results": [
                {"document": {"text": documents[i]}, "index": i, "relevance_score": s}
                for i, s in scored
            ],
            "usage": {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
        }

    def _error(
        self, status: int, message: str, problem: Rejected | None, body: object
    ) -> dict[str, Any]:
        """The dialect's error body for HTTP `status`."""
        if self.dialect == "rzenembed":
            rid = body.get("request_id") if isinstance(body, dict) else None
            rid = rid if isinstance(rid, str) else str(uuid.uuid4())
            return {"data": [], "message": message, "response_status": status, "request_id": rid}
        if self.dialect == "ctyun":
            return {
                "error": {"code": f"{status}001", "type": "INVOKE_MODEL_ERROR", "message": message}
            }
        kind = "invalid_request_error" if status < 500 else "server_error"
        if self.dialect == "qianfan":
            code = QIANFAN_CODES.get(status, "internal_error")
            return {
                "id": "as-" + uuid.uuid4().hex[:10],
                "code": code,
                "message": message,
                "type": kind,
            }
        kind, openai_code = OPENAI_ERRORS.get(status, (kind, None))
        error: dict[str, Any] = {"message": message, "type": kind, "code": openai_code}
        if self.dialect == "openai":
            error["param"] = problem.param if problem else None
        return {"error": error}


_CT: dict[str, Any] = {"content_type": "application/json"}
_RESET = web.RequestKey("fake_vendor_reset", bool)
QIANFAN_CODES = {
    400: "invalid_argument",
    401: "invalid_iam_token",
    404: "invalid_model",
    429: "rpm_rate_limit_exceeded",
}
OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
}


def _spoil(rows: list[tuple[int, _T]], fault: Fault | None) -> list[tuple[int, _T]]:
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
