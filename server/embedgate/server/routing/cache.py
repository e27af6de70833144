"""The per-input vector cache.

An entry is one input's encoded vector, keyed by what the vector depends on: the
model and its source, the instruction, the size, normalisation, the output type and
the input's content (image bytes by their hash, URIs by their text). Two tiers:

- memory: an LRU bounded in bytes, each entry living ``ttl_s`` (cachetools);
- Redis (optional): shared by every replica, entries written with the same TTL.

Lookups go to memory, then to Redis for the misses in one round trip; what Redis
had is kept in memory too. Writes to Redis are batched in the background and never
delay a caller. The cache only ever saves work: when Redis is slow or down, the
inputs it would have answered go to the model, and the outage is logged (once when
it starts, once when it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import Iterable, Sequence

import cachetools
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from embedgate.server.deadlines import time_left
from embedgate.server.domain import (
    EmbedOptions,
    Image,
    ImageInput,
    Input,
    ModelInfo,
    OutputType,
    TextImageInput,
    TextInput,
    VideoInput,
)

log = structlog.get_logger(__name__)

REDIS_PREFIX = b"embedgate:v1:"
# What an entry costs beyond its vector: the key, the LRU's links, the dict slot.
ENTRY_OVERHEAD_BYTES = 200
# Vectors waiting to be written to Redis; beyond this, new ones are not written.
MAX_PENDING_WRITES = 20_000
_OUTPUT_TAGS = {output_type: bytes([n]) for n, output_type in enumerate(OutputType)}


def vector_keys(info: ModelInfo, options: EmbedOptions, items: Sequence[Input]) -> list[bytes]:
    """What each input's vector depends on, hashed; the output type is added by
    ``entry_key``. Options are taken as they act: an unset size is the model's
    default size, an unset ``normalize`` the model's own behaviour. What the inputs of
    a call share is hashed once, then each input's content is added to a copy."""
    common = hashlib.blake2b(digest_size=20)
    dimensions = options.dimensions if options.dimensions is not None else info.dimensions.default
    normalize = options.normalize if options.normalize is not None else info.normalizes_by_default
    _field(common, info.name.encode())
    _field(common, info.source.encode())
    _field(common, options.instruction.encode())
    common.update(struct.pack("<I?", dimensions, normalize))
    keys = []
    for item in items:
        digest = common.copy()
        _content(digest, item)
        keys.append(digest.digest())
    return keys


def _content(digest: hashlib.blake2b, item: Input) -> None:
    match item:
        case TextInput(text=text):
            digest.update(b"T")
            _field(digest, text.encode())
        case ImageInput(image=image):
            digest.update(b"I")
            _image(digest, image)
        case VideoInput(frames=frames):
            digest.update(b"V" + struct.pack("<I", len(frames)))
            for frame in frames:
                _image(digest, frame)
        case TextImageInput(text=text, image=image):
            digest.update(b"P")
            _field(digest, text.encode())
            _image(digest, image)


def entry_key(vector: bytes, output_type: OutputType) -> bytes:
    return vector + _OUTPUT_TAGS[output_type]


def _field(digest: hashlib.blake2b, value: bytes) -> None:
    # Length-prefixed, so no two different field lists hash the same bytes.
    digest.update(struct.pack("<Q", len(value)))
    digest.update(value)


def _image(digest: hashlib.blake2b, image: Image) -> None:
    if image.data is not None:
        digest.update(b"d")
        _field(digest, hashlib.blake2b(image.data, digest_size=32).digest())
    else:
        digest.update(b"u")
        _field(digest, (image.uri or "").encode())


def _entry_size(payload: bytes) -> int:
    return len(payload) + ENTRY_OVERHEAD_BYTES


class VectorCache:
    """Both tiers behind two calls: ``get_many`` and ``put``."""

    def __init__(
        self,
        *,
        max_bytes: int,
        ttl_s: float,
        redis_url: str | None = None,
        redis_timeout_s: float = 0.05,
    ) -> None:
        self._ttl_s = ttl_s
        self._memory: cachetools.TTLCache[bytes, bytes] | None = (
            cachetools.TTLCache(maxsize=max_bytes, ttl=ttl_s, getsizeof=_entry_size)
            if max_bytes > 0
            else None
        )
        self._redis_url = redis_url
        self._redis: aioredis.Redis | None = None
        self._redis_timeout_s = redis_timeout_s
        self._pending: dict[bytes, bytes] = {}
        self._writer: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        if self._redis_url is None:
            return
        self._redis = aioredis.Redis.from_url(
            self._redis_url,
            socket_timeout=max(self._redis_timeout_s, 1.0),
            socket_connect_timeout=max(self._redis_timeout_s, 1.0),
        )
        try:  # say at start-up whether the shared tier answers; serve either way
            async with asyncio.timeout(2.0):
                await self._redis.ping()
            log.info("cache_redis_connected")
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)

    async def close(self) -> None:
        if self._writer is not None:
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.shield(self._writer)
            except (TimeoutError, asyncio.CancelledError):
                self._writer.cancel()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        found: list[bytes | None] = [None] * len(keys)
        missing: list[int] = []
        for position, key in enumerate(keys):
            payload = self._memory.get(key) if self._memory is not None else None
            if payload is None:
                missing.append(position)
            else:
                found[position] = payload
        if missing and self._redis is not None:
            shared = await self._redis_get([keys[position] for position in missing])
            for position, payload in zip(missing, shared, strict=True):
                if payload is not None:
                    found[position] = payload
                    self._remember(keys[position], payload)
        return found

    def put(self, key: bytes, payload: bytes) -> None:
        self._remember(key, payload)
        if self._redis is None:
            return
        if len(self._pending) >= MAX_PENDING_WRITES:
            return  # Redis is not keeping up; this vector stays in memory only
        self._pending[key] = payload
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())

    def _remember(self, key: bytes, payload: bytes) -> None:
        if self._memory is None:
            return
        with contextlib.suppress(ValueError):  # raised when larger than the whole tier
            self._memory[key] = payload

    async def _redis_get(self, keys: Iterable[bytes]) -> list[bytes | None]:
        assert self._redis is not None
        names = [REDIS_PREFIX + key for key in keys]
        budget = self._redis_timeout_s
        left = time_left()
        if left is not None:
            budget = min(budget, left)
        try:
            async with asyncio.timeout(budget):
                values = await self._redis.mget(names)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return [None] * len(names)
        self._recovered()
        return [value if isinstance(value, bytes) else None for value in values]

    async def _write_pending(self) -> None:
        assert self._redis is not None
        ttl_ms = max(1, int(self._ttl_s * 1000))
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                async with asyncio.timeout(max(self._redis_timeout_s, 1.0)):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key, payload in batch.items():
                            pipe.set(REDIS_PREFIX + key, payload, px=ttl_ms)
                        await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
                return  # these vectors stay in memory only
            self._recovered()

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            # The error's type only: its text may hold the URL and its password.
            log.warning("cache_redis_unavailable", error_type=type(exc).__name__)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("cache_redis_recovered")
