"""Which deployment of a model takes the next vendor request. No I/O.

The usable deployments of the lowest priority with any usable one are the candidates:
usable means its breaker lets an attempt through and it is not waiting out a vendor's
``Retry-After``. Among them, two are drawn by weight and the one with fewer requests in
flight per unit of weight wins ("power of two choices"). Drawn by weight, the shares
follow the weights exactly when requests come one at a time; under load, the less busy
of the two takes the request, which evens out slow and fast deployments without the
herd that always picking the least busy one makes when several replicas (each seeing
only its own in-flight counts) pick at once.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from embedgate.server.routing.breaker import Breaker


@dataclass(eq=False, slots=True)
class Member:
    """One deployment as the balancer sees it."""

    name: str
    breaker: Breaker = field(default_factory=Breaker)
    weight: int = 1
    priority: int = 0
    in_flight: int = 0
    # Waiting out a 429's Retry-After until then (the breaker's clock): not broken.
    waiting_until: float = 0.0

    def usable(self, now: float) -> bool:
        return now >= self.waiting_until and self.breaker.usable()

    def ready_at(self, now: float) -> float:
        """When it may take a request again (``now`` if it may now)."""
        at = self.waiting_until
        if not self.breaker.usable():
            at = max(at, self.breaker.retry_at)
        return max(at, now)


def choose(
    members: Sequence[Member],
    now: float,
    *,
    avoid: Collection[Member] = (),
    rng: random.Random | None = None,
) -> Member | None:
    """The member for the next attempt, or None when none is usable. Members in
    ``avoid`` (those that just failed this call) are chosen only when no other is
    usable."""
    usable = [member for member in members if member.usable(now)]
    preferred = [member for member in usable if member not in avoid] or usable
    if not preferred:
        return None
    tier = min(member.priority for member in preferred)
    candidates = [member for member in preferred if member.priority == tier]
    if len(candidates) == 1:
        return candidates[0]
    draw = rng or random
    first = draw.choices(candidates, weights=[m.weight for m in candidates])[0]
    rest = [member for member in candidates if member is not first]
    second = draw.choices(rest, weights=[m.weight for m in rest])[0]
    if second.in_flight / second.weight < first.in_flight / first.weight:
        return second
    return first


def ready_at(members: Sequence[Member], now: float) -> float:
    """When the first member may take a request again: for the ``RetryInfo`` of a call
    that found none usable."""
    return min(member.ready_at(now) for member in members)
