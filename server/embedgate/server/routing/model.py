"""A served model as routing hands it to a door.

A door holds a ``Model`` between resolving a name and calling the router with it: it
reads what the model is (``info``); how the model is reached (its provider, its batching
queue) is routing's own business.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedgate.server.domain import ModelInfo
from embedgate.server.providers.base import Provider
from embedgate.server.routing.coalesce import Coalescer


@dataclass(frozen=True, eq=False, slots=True)
class Model:
    provider: Provider
    queue: Coalescer

    @property
    def info(self) -> ModelInfo:
        return self.provider.info

    @property
    def name(self) -> str:
        return self.provider.info.name
