"""A circuit breaker for one deployment of a model: a small state machine with no I/O
and an injectable clock.

::

    CLOSED ──(failures in a row, confirmed by the failure rate)──▶ OPEN
      ▲                                                           │ open_s passed
      │ the probe succeeds                                        ▼
      └──────────────────────────────── HALF_OPEN (one probe at a time)
                                            │ the probe fails
                                            └──▶ OPEN (for open_s again)

What counts is the vendor's side only: no reply, 408 and 5xx, an unusable reply, a
refused key. A 400 is an answer (the vendor is alive) and a 429 with ``Retry-After`` is
a wait, not a breakage: the caller records neither as a failure.

The rule for opening is ``failures`` failures in a row *and* at least half of the last
``window`` outcomes failed; for the last deployment of a model still in service, a full
window with nine failures in ten (at 10 % errors, about once in 10^16 windows): a run of
bad luck there would turn into NO_DEPLOYMENT_AVAILABLE for every caller.

A deployment that is down fails every attempt and opens after ``failures`` of them (the
last one in service after a window of them). One with occasional errors does not open
by a run of bad luck: at 10 % errors, five failures in a row happen about once in 100,000
attempts, five in a row that are also half of the last 20 about once in 8 million (1e-5
times the chance of 5 or more failures among the 15 before them, 1.3 %).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class State(enum.IntEnum):
    """The breaker's state; the values are the ``breaker_state`` gauge's."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """``failures`` in a row (confirmed by the failure rate over ``window``) open the
    breaker for ``open_s`` seconds."""

    failures: int = 5
    open_s: float = 10.0
    window: int = 20

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window < self.failures or self.open_s < 0:
            raise ValueError("need failures >= 1, window >= failures and open_s >= 0")


# A breaker changes state: (old, new).
Transition = Callable[[State, State], None]


class Breaker:
    """One deployment's breaker. Ask ``allow()`` before an attempt; report it with
    ``succeeded()`` or ``failed()`` (or ``released()`` when it ended without a verdict,
    such as a cancelled call or a 429 wait)."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Clock = time.monotonic,
        on_transition: Transition | None = None,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_transition = on_transition
        self._state = State.CLOSED
        self._in_a_row = 0
        self._recent: deque[bool] = deque(maxlen=self.policy.window)  # True: a failure
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        """The state now: an open breaker whose time is up is half-open."""
        if self._state is State.OPEN and self._clock() >= self.retry_at:
            self._move(State.HALF_OPEN)
        return self._state

    @property
    def retry_at(self) -> float:
        """When an open breaker lets a probe through (on the breaker's clock)."""
        return self._opened_at + self.policy.open_s

    def usable(self) -> bool:
        """Whether an attempt may go now: closed, or half-open with no probe out."""
        state = self.state
        return state is State.CLOSED or (state is State.HALF_OPEN and not self._probing)

    def allow(self) -> bool:
        """Take the right to make one attempt now; a half-open breaker gives it to one
        attempt at a time (the probe)."""
        if not self.usable():
            return False
        if self._state is State.HALF_OPEN:
            self._probing = True
        return True

    def succeeded(self) -> None:
        self._probing = False
        self._in_a_row = 0
        self._recent.append(False)
        if self._state is not State.CLOSED:
            self._recent.clear()
            self._move(State.CLOSED)

    def failed(self, *, last: bool = False) -> None:
        """An attempt failed on the vendor's side. ``last``: no other deployment of the
        model could take requests now, so opening would leave callers with nothing."""
        self._probing = False
        self._in_a_row += 1
        self._recent.append(True)
        if self._state is State.HALF_OPEN or self._should_open(last):
            self._open()

    def trip(self) -> None:
        """Open now, whatever came before (the vendor refused the deployment's key):
        out of service for ``open_s``, then a probe finds out whether it still is."""
        self._probing = False
        self._open()

    def released(self) -> None:
        """An attempt ended with no verdict on the deployment: a probe's slot is free."""
        self._probing = False

    def _should_open(self, last: bool) -> bool:
        if self._state is not State.CLOSED or self._in_a_row < self.policy.failures:
            return False
        failed = sum(self._recent)
        if last:
            # The last deployment in service is taken out only on proof that it is down:
            # a full window of outcomes, nine in ten of them failures.
            window = self.policy.window
            return len(self._recent) == window and 10 * failed >= 9 * window
        return 2 * failed >= len(self._recent)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._in_a_row = 0
        self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old, self._state = self._state, new
        if old is not new and self._on_transition is not None:
            self._on_transition(old, new)
