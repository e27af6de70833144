"""One record per RPC: the access-log line and the RPC metrics, written once at its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextvars import ContextVar

import grpc
import structlog

from embedgate.server.logs import write_info
from embedgate.server.metrics import Metrics

log = structlog.get_logger("embedgate.access")

REQUEST_ID_HEADER = "x-request-id"


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    """The first text value of ``key`` in a call's metadata (keys arrive lower-cased)."""
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return None


# The door a call came through, when not gRPC's own ("openai", ...): its access line says.
DOOR: ContextVar[str | None] = ContextVar("embedgate_door", default=None)


class Access:
    """Collects the fields of one access-log line, and the request id the RPC sends
    back (in trailing metadata: no extra operation, on success and on failure)."""

    __slots__ = ("caller", "fields", "metrics", "protocol", "request_id", "started")

    def __init__(self, method: str, metrics: Metrics) -> None:
        self.fields: dict[str, object] = {"method": method}
        # Who the call is for (see ``callers.py``); the service names it.
        self.caller = "anonymous"
        door = DOOR.get()
        self.protocol = door or "grpc"
        if door is not None:
            self.fields["protocol"] = door
        self.metrics = metrics
        self.started = time.perf_counter()
        self.request_id = ""

    def emit(self, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - self.started
        method = str(self.fields["method"])
        model = str(self.fields.get("model") or "")
        self.metrics.rpc_finished(method, model, code.name, seconds, self.protocol)
        if not log.is_enabled_for(logging.INFO):  # skip the work when the line is dropped
            return
        write_info(
            "rpc_finished",
            {"code": code.name, "duration_ms": round(seconds * 1000, 3), **self.fields},
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_HEADER, self.request_id),) if self.request_id else ()
