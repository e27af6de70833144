"""Model health on its own (health.py): failures in a row, a refused key, recovery, and
listeners told of each change once."""

from __future__ import annotations

from embedgate.server.health import Health


def test_failures_in_a_row_then_a_success() -> None:
    """A model is NOT_SERVING after unhealthy_after failures in a row (a success in
    between starts the count again) and SERVING after the next success; listeners hear
    each change once, other models are untouched."""
    health = Health(unhealthy_after=2)
    heard: list[tuple[str, bool]] = []
    health.on_change(lambda model, serving: heard.append((model, serving)))
    a, b = health.model("a"), health.model("b")
    a.failed()
    a.succeeded()
    a.failed()
    assert health.serving("a")
    a.failed()
    a.failed()
    assert not health.serving("a")
    assert health.serving("b")
    a.succeeded()
    b.succeeded()
    assert heard == [("a", False), ("a", True)]


def test_a_refused_key_is_not_serving_at_once() -> None:
    """The vendor refusing the gateway's key needs the operator: NOT_SERVING at once."""
    health = Health(unhealthy_after=5)
    health.model("a").out_of_service()
    assert not health.serving("a")
