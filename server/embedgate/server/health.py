"""Each model's health, as the gateway's health service reports it.

A vendor model is NOT_SERVING while its vendor refuses the gateway's key, or after
``unhealthy_after`` calls in a row failed for the vendor's sake (no reply, 5xx,
timeouts, after retries); it is SERVING again after a call that succeeds. Listeners
(the gRPC health service, the ``embedgate_model_serving`` gauge) hear each change.
"""

from __future__ import annotations

from collections.abc import Callable

# A model's health changes: (model name, serving).
HealthListener = Callable[[str, bool], None]


class Health:
    """The health of every model of one gateway."""

    def __init__(self, *, unhealthy_after: int = 3) -> None:
        self.unhealthy_after = unhealthy_after
        self._listeners: list[HealthListener] = []
        self._unhealthy: set[str] = set()

    def on_change(self, listener: HealthListener) -> None:
        self._listeners.append(listener)

    def serving(self, model: str) -> bool:
        return model not in self._unhealthy

    def model(self, name: str) -> ModelHealth:
        """The health of model ``name``, for its provider to report calls to."""
        return ModelHealth(self, name)

    def _mark(self, model: str, *, serving: bool) -> None:
        if self.serving(model) == serving:
            return
        if serving:
            self._unhealthy.discard(model)
        else:
            self._unhealthy.add(model)
        for listener in self._listeners:
            listener(model, serving)


class ModelHealth:
    """One model's calls as its health sees them."""

    __slots__ = ("_failures", "_health", "_name")

    def __init__(self, health: Health, name: str) -> None:
        self._health = health
        self._name = name
        self._failures = 0

    def succeeded(self) -> None:
        self._failures = 0
        self._health._mark(self._name, serving=True)

    def failed(self) -> None:
        """A call failed for the vendor's sake (no reply, 5xx, timeouts), retries spent."""
        self._failures += 1
        if self._failures >= self._health.unhealthy_after:
            self._health._mark(self._name, serving=False)

    def out_of_service(self) -> None:
        """Nothing can serve the model now: its vendor refuses the gateway's key (every
        key of a pool), or every deployment of it is out of service."""
        self._health._mark(self._name, serving=False)
