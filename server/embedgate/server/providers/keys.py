"""The keys of one vendor model, used in turn.

A key the vendor refuses (401/403) leaves the pool for good: keys are read once, at
start-up, so it cannot come back before a restart. A key the vendor tells to wait (429,
with its ``Retry-After``) sits out that long while the others carry on. Keys are known
by their position in the configuration, never by their value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class KeyPool:
    def __init__(self, keys: Sequence[str], *, clock: Callable[[], float] = time.monotonic):
        self._keys = list(keys)
        self._clock = clock
        self._refused = [False] * len(self._keys)
        self._waiting_until = [0.0] * len(self._keys)
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key, refused ones included (to redact them all from vendors' words)."""
        return tuple(self._keys)

    @property
    def in_service(self) -> int:
        """Keys not refused (waiting ones included)."""
        return self._refused.count(False)

    def pick(self) -> int | None:
        """The next key that may be used now, in turn; None when there is none."""
        now = self._clock()
        for step in range(len(self._keys)):
            index = (self._next + step) % len(self._keys)
            if not self._refused[index] and self._waiting_until[index] <= now:
                self._next = index + 1
                return index
        return None

    def refuse(self, index: int) -> None:
        self._refused[index] = True

    def wait(self, index: int, seconds: float) -> None:
        self._waiting_until[index] = self._clock() + seconds

    def ready_in(self) -> float | None:
        """Seconds until a waiting key may be used again; None when every key is refused."""
        now = self._clock()
        waits = [
            max(0.0, until - now)
            for until, refused in zip(self._waiting_until, self._refused, strict=True)
            if not refused
        ]
        return min(waits) if waits else None
