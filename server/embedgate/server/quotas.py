"""Quotas: at most N units (vendor requests, tokens) in any window of a given length,
held by every replica together when they share a Redis.

A window is kept as a hundred buckets of its length's hundredth, each holding what was
taken in it. A take counts every bucket that may still lie in the window, the oldest
one whole, so the sum is never below what the last ``period`` really saw: N per window
is never exceeded, across a window's edge either, at the price of up to a hundredth of
the limit left unused. A refused take says how long until enough buckets have aged out.
Several limits (a deployment's requests and tokens, its key's) are taken together or
not at all.

Shared, the buckets are a Redis hash per limit, taken by one atomic Lua script on
Redis's own clock, so replicas agree on time too. Written here rather than taken from
``limits``: its exact moving window keeps one Redis list entry per unit (a million-token
limit would be a million entries) and cannot give back the difference between a token
estimate and the vendor's count, and its other windows let up to twice the limit
through across a window's edge.

When Redis cannot be reached, each replica limits on its own at ``local_share`` of
every limit, logging the outage once; it tries Redis again every second. No call ever
fails because of Redis alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from embedgate.server.config import RATE_PATTERN

log = structlog.get_logger("embedgate.quotas")

BUCKETS = 100
PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
# How long a replica limits locally after Redis failed, before trying it again.
REDIS_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` units per ``period_s`` seconds, as written (``600/minute``)."""

    count: int
    period_s: float
    text: str

    @property
    def period_ms(self) -> int:
        return int(self.period_s * 1000)

    def ask(self, key: str, cost: int) -> Ask:
        """``cost`` units of this rate in the window named ``key``; a cost above the whole
        limit asks for all of it (it goes through an empty window)."""
        return Ask(key, self.count, self.period_ms, max(0, min(cost, self.count)))

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = re.match(RATE_PATTERN, text)
        if match is None:
            raise ValueError(f"{text!r} is not a rate: N/second, N/minute, N/hour or N/day")
        return cls(int(match.group(1)), PERIODS[match.group(2)], text.strip())


@dataclass(frozen=True, slots=True)
class Ask:
    """``cost`` units of the limit named ``key``: at most ``limit`` per ``period_ms``."""

    key: str
    limit: int
    period_ms: int
    cost: int

    @property
    def width_ms(self) -> int:
        return max(1, self.period_ms // BUCKETS)

    def oldest_bucket(self, now_ms: int) -> int:
        """The oldest bucket that may still lie in the window at ``now_ms``."""
        return (now_ms - self.period_ms) // self.width_ms


@dataclass(frozen=True, slots=True)
class Taken:
    """The answer to a take: each ask's wait in seconds (all 0: taken, every ask; any
    other: nothing was taken), and the bucket each went into, to settle it later."""

    waits: tuple[float, ...]
    buckets: tuple[int, ...]
    # Taken from the replica's own limiter (Redis unreachable), not the shared one.
    local: bool = False

    @property
    def granted(self) -> bool:
        return not any(self.waits)


class Store(Protocol):
    """Where windows are kept."""

    async def take(self, asks: Sequence[Ask]) -> Taken: ...

    async def settle(self, ask: Ask, bucket: int, delta: int, *, local: bool) -> None:
        """Add ``delta`` (which may be negative) to what ``ask`` took in ``bucket``,
        if that bucket is still in its window."""
        ...

    async def close(self) -> None: ...


def live_total(buckets: dict[int, int], ask: Ask, now_ms: int) -> int:
    """What the window of ``ask`` holds at ``now_ms`` (its buckets by index), as a take
    counts it: every bucket that may still lie in the window, the oldest whole."""
    oldest = ask.oldest_bucket(now_ms)
    return sum(amount for bucket, amount in buckets.items() if bucket >= oldest)


def _wait_ms(buckets: dict[int, int], ask: Ask, now_ms: int) -> int:
    """How long until ``ask`` fits in a window whose live buckets are ``buckets``
    (0: it fits now)."""
    over = sum(buckets.values()) + ask.cost - ask.limit
    if over <= 0:
        return 0
    width = ask.width_ms
    for bucket in sorted(buckets):
        over -= buckets[bucket]
        if over <= 0:
            return max(1, (bucket + 1) * width + ask.period_ms - now_ms)
    return ask.period_ms


class LocalStore:
    """The windows of one replica, in memory."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, dict[int, int]] = {}

    def _live(self, ask: Ask, now_ms: int) -> dict[int, int]:
        window = self._windows.setdefault(ask.key, {})
        oldest = ask.oldest_bucket(now_ms)
        for bucket in [bucket for bucket in window if bucket < oldest]:
            del window[bucket]
        return window

    async def take(self, asks: Sequence[Ask]) -> Taken:
        now_ms = int(self._clock() * 1000)
        windows = [self._live(ask, now_ms) for ask in asks]
        waits = tuple(
            _wait_ms(window, ask, now_ms) / 1000 for window, ask in zip(windows, asks, strict=True)
        )
        buckets = tuple(now_ms // ask.width_ms for ask in asks)
        if not any(waits):
            for window, ask, bucket in zip(windows, asks, buckets, strict=True):
                window[bucket] = window.get(bucket, 0) + ask.cost
        return Taken(waits, buckets, local=True)

    async def settle(self, ask: Ask, bucket: int, delta: int, *, local: bool = True) -> None:
        window = self._windows.get(ask.key)
        if window is not None and bucket in window:
            window[bucket] += delta

    async def close(self) -> None:
        return None


# KEYS: one hash per limit; ARGV: limit, period (ms) and cost of each, in turn. Returns
# each limit's wait (ms, 0 when it fits) then each one's bucket; takes every cost only
# when every limit fits.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local waits, buckets, refused = {}, {}, false
for i, key in ipairs(KEYS) do
  local limit, period, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local width = math.max(1, math.floor(period / {buckets}))
  local oldest = math.floor((now - period) / width)
  local fields = redis.call('HGETALL', key)
  local live, used = {}, 0
  for j = 1, #fields, 2 do
    local bucket = tonumber(fields[j])
    if bucket < oldest then
      redis.call('HDEL', key, fields[j])
    else
      local amount = tonumber(fields[j + 1])
      used = used + amount
      live[#live + 1] = {bucket, amount}
    end
  end
  local wait, over = 0, used + cost - limit
  if over > 0 then
    refused = true
    wait = period
    table.sort(live, function(a, b) return a[1] < b[1] end)
    for _, entry in ipairs(live) do
      over = over - entry[2]
      if over <= 0 then
        wait = math.max(1, (entry[1] + 1) * width + period - now)
        break
      end
    end
  end
  waits[i] = wait
  buckets[i] = math.floor(now / width)
end
if not refused then
  for i, key in ipairs(KEYS) do
    local period = tonumber(ARGV[3*i-1])
    redis.call('HINCRBY', key, buckets[i], tonumber(ARGV[3*i]))
    redis.call('PEXPIRE', key, period + math.max(1, math.floor(period / {buckets})))
  end
end
for i = 1, #buckets do waits[#waits + 1] = buckets[i] end
return waits
""".replace("{buckets}", str(BUCKETS))

_SETTLE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
end
"""


class SharedStore:
    """Windows in a Redis shared by every replica, with the replica's own limiter at
    ``local_share`` of each limit while Redis cannot be reached."""

    def __init__(
        self,
        redis_url: str,
        *,
        local_share: float = 1.0,
        timeout_s: float = 0.1,
        on_local: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._take = self._redis.register_script(_TAKE)
        self._settle = self._redis.register_script(_SETTLE)
        self._share = local_share
        self._timeout_s = timeout_s
        self._local = LocalStore(clock=clock)
        self._on_local = on_local
        self._clock = clock
        # Redis failed: limit locally until then, then try it again.
        self._down_until: float | None = None

    @property
    def local(self) -> bool:
        """Whether this replica is limiting on its own now (Redis unreachable)."""
        return self._down_until is not None

    async def take(self, asks: Sequence[Ask]) -> Taken:
        if self._down_until is not None and self._clock() < self._down_until:
            return await self._take_locally(asks)
        keys = [ask.key for ask in asks]
        args = [value for ask in asks for value in (ask.limit, ask.period_ms, ask.cost)]
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._take(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            return await self._take_locally(asks)
        self._reached()
        count = len(asks)
        return Taken(
            tuple(int(wait) / 1000 for wait in reply[:count]),
            tuple(int(bucket) for bucket in reply[count:]),
        )

    async def settle(self, ask: Ask, bucket: int, delta: int, *, local: bool) -> None:
        if local:
            await self._local.settle(self._scaled(ask), bucket, delta)
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._settle(keys=[ask.key], args=[bucket, delta])
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)  # the window keeps the estimate: the safe side

    async def close(self) -> None:
        await self._redis.aclose()

    def _scaled(self, ask: Ask) -> Ask:
        return dataclasses.replace(ask, limit=max(1, math.floor(ask.limit * self._share)))

    async def _take_locally(self, asks: Sequence[Ask]) -> Taken:
        return await self._local.take([self._scaled(ask) for ask in asks])

    def _failed(self, error: BaseException) -> None:
        if self._down_until is None:
            # The error's type only: its text may hold the URL and its password.
            log.warning(
                "quota_store_unreachable",
                error_type=type(error).__name__,
                local_share=self._share,
            )
            if self._on_local is not None:
                self._on_local(True)
        self._down_until = self._clock() + REDIS_RETRY_S

    def _reached(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            log.info("quota_store_reachable")
            if self._on_local is not None:
                self._on_local(False)


@dataclass(frozen=True, slots=True)
class Limits:
    """What may be spent per window: vendor requests, tokens (either may be absent)."""

    requests: Rate | None = None
    tokens: Rate | None = None

    def __bool__(self) -> bool:
        return self.requests is not None or self.tokens is not None


@dataclass(frozen=True, slots=True)
class QuotaLimit:
    """One limit of a quota, as the store knows it and as a caller is told of it."""

    key: str
    rate: Rate
    # Counts tokens (else vendor requests).
    tokens: bool
    # The key of a pool whose own limit it is (else the deployment's).
    key_index: int | None = None

    @property
    def of_key(self) -> bool:
        return self.key_index is not None

    @property
    def kind(self) -> str:
        """As a metric label: requests, tokens, key_requests, key_tokens."""
        return ("key_" if self.of_key else "") + ("tokens" if self.tokens else "requests")

    @property
    def what(self) -> str:
        return f"{self.rate.text} {'tokens' if self.tokens else 'vendor requests'}"

    def ask(self, tokens: int) -> Ask:
        return self.rate.ask(self.key, tokens if self.tokens else 1)


def _limits(prefix: str, limits: Limits, key: int | None = None) -> tuple[QuotaLimit, ...]:
    found = []
    if limits.requests is not None:
        found.append(QuotaLimit(f"{prefix}:requests", limits.requests, False, key))
    if limits.tokens is not None:
        found.append(QuotaLimit(f"{prefix}:tokens", limits.tokens, True, key))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A quota with no room now: how long until it has, and which limits refused."""

    wait_s: float
    limits: tuple[QuotaLimit, ...]

    @property
    def by_key(self) -> bool:
        """Only a key's own limits refused: another key of the pool may have room."""
        return all(limit.of_key for limit in self.limits)


class Quota:
    """The vendor quotas of one deployment: its own limits and each key's (keys known
    by position). ``scope`` names them in the store: replicas serving the same model
    and deployment share them."""

    def __init__(self, scope: str, own: Limits, keys: Sequence[Limits] = (), *, store: Store):
        self.store = store
        # A Redis hash tag: the limits of one deployment share a cluster slot.
        prefix = f"embedgate:quota:{{{scope}}}"
        self._own = _limits(prefix, own)
        self._keys = [_limits(f"{prefix}:key{i}", limits, i) for i, limits in enumerate(keys)]

    def __bool__(self) -> bool:
        return bool(self._own) or any(self._keys)

    def admission(self, tokens: int) -> Admission:
        """One vendor request's takes (one per attempt), estimated at ``tokens``."""
        return Admission(self, tokens)

    def limits(self, key: int | None) -> tuple[QuotaLimit, ...]:
        own = self._keys[key] if key is not None and key < len(self._keys) else ()
        return self._own + own


class Admission:
    """One vendor request's takes from its deployment's quota: each attempt takes its
    share before it is sent; ``settle`` corrects the last one's token estimate by the
    count the vendor reported."""

    def __init__(self, quota: Quota, tokens: int) -> None:
        self._quota = quota
        self._tokens = tokens
        self._last: tuple[tuple[QuotaLimit, ...], Taken] | None = None

    async def take(self, key: int | None) -> Refusal | None:
        """Take one attempt's share (None), or say why there is no room."""
        limits = self._quota.limits(key)
        if not limits:
            return None
        asks = [limit.ask(self._tokens) for limit in limits]
        taken = await self._quota.store.take(asks)
        if taken.granted:
            self._last = (limits, taken)
            return None
        refused = [limit for limit, wait in zip(limits, taken.waits, strict=True) if wait]
        # A millisecond more: a timer may fire a hair early, and the windows count whole
        # milliseconds.
        return Refusal(max(taken.waits) + 0.001, tuple(refused))

    async def settle(self, tokens: int | None) -> None:
        """The vendor counted ``tokens`` for the request (None: it did not say)."""
        if tokens is None or self._last is None:
            return
        limits, taken = self._last
        for limit, bucket in zip(limits, taken.buckets, strict=True):
            if not limit.tokens:
                continue
            ask = limit.ask(self._tokens)
            if tokens != ask.cost:
                await self._quota.store.settle(ask, bucket, tokens - ask.cost, local=taken.local)
