"""The breaker of a deployment and the choice among deployments, as pure state machines on
a fake clock: when a breaker opens (and when it must not), its half-open probe, and how
the balancer follows priorities, weights, load and a breaker's verdict."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from embedgate.server.routing.balance import Member, choose, ready_at
from embedgate.server.routing.breaker import Breaker, BreakerPolicy, State


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def seeded(seed: int) -> random.Random:
    """A reproducible draw (the balancer's jitter, not a secret)."""
    return random.Random(seed)  # noqa: S311


def state(made: Breaker) -> State:
    """The breaker's state now (read through a call: it changes with the clock)."""
    return made.state


def breaker(clock: FakeClock, **policy: float) -> tuple[Breaker, list[tuple[State, State]]]:
    moves: list[tuple[State, State]] = []
    made = Breaker(
        BreakerPolicy(**policy),  # type: ignore[arg-type]
        clock=clock,
        on_transition=lambda old, new: moves.append((old, new)),
    )
    return made, moves


def test_a_deployment_that_is_down_opens_after_failures_in_a_row() -> None:
    """Every attempt failing: open after `failures` of them, and no attempt is allowed
    until open_s has passed; then one probe, alone."""
    clock = FakeClock()
    made, moves = breaker(clock, failures=5, open_s=10)
    for _ in range(4):
        assert made.allow()
        made.failed()
    assert state(made) is State.CLOSED
    assert made.allow()
    made.failed()
    assert state(made) is State.OPEN
    assert not made.allow()
    assert made.retry_at == 1010.0
    clock.now = 1009.9
    assert not made.usable()
    clock.now = 1010.0
    assert state(made) is State.HALF_OPEN
    assert made.allow()  # the probe
    assert not made.allow()  # one at a time
    assert moves == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]


def test_the_probe_decides() -> None:
    """A probe that succeeds closes the breaker; one that fails opens it for open_s
    again; one that ends without a verdict frees the slot for the next probe."""
    clock = FakeClock()
    made, moves = breaker(clock, failures=1, open_s=5, window=1)
    made.failed()
    clock.now += 5
    assert made.allow()
    made.failed()
    assert state(made) is State.OPEN
    assert made.retry_at == clock.now + 5
    clock.now += 5
    assert made.allow()
    made.released()
    assert made.allow()
    made.succeeded()
    assert state(made) is State.CLOSED
    assert moves[-1] == (State.HALF_OPEN, State.CLOSED)


def test_a_run_of_bad_luck_does_not_open_a_healthy_deployment() -> None:
    """Five failures in a row after fifteen successes are a quarter of the window, not
    half: a deployment with occasional errors stays in service."""
    made, _ = breaker(FakeClock(), failures=5, window=20)
    for _ in range(15):
        made.succeeded()
    for _ in range(5):
        made.failed()
    assert state(made) is State.CLOSED
    for _ in range(5):
        made.failed()
    assert state(made) is State.OPEN


def test_occasional_errors_never_open_it_in_a_long_run() -> None:
    """100,000 attempts at 10 % failures (seeded) never open the breaker with the
    default rule."""
    made, moves = breaker(FakeClock())
    draw = seeded(7)
    for _ in range(100_000):
        if draw.random() < 0.1:
            made.failed()
        else:
            made.succeeded()
    assert moves == []


def test_a_policy_that_cannot_work_is_refused() -> None:
    """The window must hold the failures in a row it asks for."""
    with pytest.raises(ValueError, match="window"):
        BreakerPolicy(failures=5, window=3)


def test_the_lowest_priority_with_a_usable_deployment_is_used() -> None:
    """Priority 1 takes traffic only when every priority-0 deployment is unusable."""
    clock = FakeClock()
    main = Member("main", Breaker(BreakerPolicy(failures=1, window=1), clock=clock))
    spare = Member("spare", priority=1)
    assert choose([spare, main], clock.now) is main
    main.breaker.failed()
    assert choose([spare, main], clock.now) is spare


def test_weights_share_the_traffic() -> None:
    """Requests one at a time follow the weights (2:1) within a few percent."""
    heavy, light = Member("heavy", weight=2), Member("light", weight=1)
    draw = seeded(3)
    counts = Counter(choose([heavy, light], 0.0, rng=draw).name for _ in range(6000))  # type: ignore[union-attr]
    assert abs(counts["heavy"] / 6000 - 2 / 3) < 0.03


def test_the_less_busy_of_two_wins() -> None:
    """With two candidates, the one with fewer requests in flight per weight takes it."""
    busy, idle = Member("busy", in_flight=8), Member("idle", in_flight=1)
    draw = seeded(5)
    assert {choose([busy, idle], 0.0, rng=draw).name for _ in range(50)} == {"idle"}  # type: ignore[union-attr]


def test_the_deployment_that_just_failed_is_avoided_when_another_can_go() -> None:
    """A retry goes elsewhere when it can; to the same one only when it is the last."""
    first, second = Member("first"), Member("second")
    draw = seeded(1)
    assert {choose([first, second], 0.0, avoid=[first], rng=draw) for _ in range(20)} == {second}
    assert choose([first], 0.0, avoid=[first]) is first


def test_waiting_out_a_retry_after_is_not_usable_and_says_until_when() -> None:
    """A deployment told to come back later is skipped until then; when none is usable
    the balancer says so, and when the first one will be."""
    clock = FakeClock()
    waiting = Member("waiting", waiting_until=clock.now + 3)
    broken = Member("broken", Breaker(BreakerPolicy(failures=1, window=1, open_s=7), clock=clock))
    broken.breaker.failed()
    assert choose([waiting, broken], clock.now) is None
    assert ready_at([waiting, broken], clock.now) == clock.now + 3
    clock.now += 3
    assert choose([waiting, broken], clock.now) is waiting


def test_the_last_deployment_in_service_needs_proof_that_it_is_down() -> None:
    """For the last usable deployment of a model, failures in a row are not enough: it
    opens only on a full window with nine failures in ten; one that is down opens once
    the window is full; one with 10 % errors never does (100,000 seeded attempts)."""
    clock = FakeClock()
    made, _ = breaker(clock, failures=5, window=20)
    for _ in range(19):
        made.failed(last=True)
    assert state(made) is State.CLOSED
    made.failed(last=True)
    assert state(made) is State.OPEN
    steady, moves = breaker(FakeClock(), failures=1, window=20)
    draw = seeded(11)
    for _ in range(100_000):
        if draw.random() < 0.1:
            steady.failed(last=True)
        else:
            steady.succeeded()
    assert moves == []
