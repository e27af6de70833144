"""The caller's deadline, carried from the edge down to every vendor call.

The edge opens a scope per RPC with the time the caller gave (or the configured
default); tasks the router spawns copy the context, so the HTTP driver finds the same
deadline without it being threaded through every signature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# An absolute time on the running loop's clock (``loop.time()``); None: no deadline.
_DEADLINE: ContextVar[float | None] = ContextVar("embedgate_deadline", default=None)


class deadline_scope:  # noqa: N801 - used like a function: ``with deadline_scope(5):``
    """Work inside this block must end within ``seconds`` from now. (A class rather
    than a generator-based context manager: it is entered on every RPC.)"""

    __slots__ = ("_at", "_token")

    def __init__(self, seconds: float) -> None:
        self._at = asyncio.get_running_loop().time() + max(0.0, seconds)

    def __enter__(self) -> float:
        self._token = _DEADLINE.set(self._at)
        return self._at

    def __exit__(self, *exc: object) -> None:
        _DEADLINE.reset(self._token)


@contextmanager
def deadline_at(at: float | None) -> Iterator[None]:
    """Work inside this block must end by ``at`` (a ``loop.time()``; None: no limit).
    Used where work shared by several callers runs until the latest of them."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    return _DEADLINE.get()


def time_left() -> float | None:
    """Seconds until the current deadline (negative once past), or None without one."""
    at = _DEADLINE.get()
    if at is None:
        return None
    return at - asyncio.get_running_loop().time()
