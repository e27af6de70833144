"""One record per RPC: the access-log line and the RPC metrics, written once at its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import grpc
import structlog
from opentelemetry.trace import Span, StatusCode

from embedgate.server.logs import write_info
from embedgate.server.metrics import Metrics
from embedgate.server.tracing import TRACE_ID_HEADER, trace_id
from embedgate.v1 import embedding_service_pb2 as pb

log = structlog.get_logger("embedgate.access")

REQUEST_ID_HEADER = "x-request-id"


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    """The first text value of ``key`` in a call's metadata (keys arrive lower-cased)."""
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return None


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# The codes that mark a server span as failed (the gateway's fault, not the caller's).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

# The door a call came through, when not gRPC's own ("openai", ...): its access line says.
DOOR: ContextVar[str | None] = ContextVar("embedgate_door", default=None)


class Access:
    """Collects the fields of one access-log line, and the request id the RPC sends
    back (in trailing metadata: no extra operation, on success and on failure)."""

    __slots__ = ("caller", "fields", "metrics", "protocol", "request_id", "span", "started")

    def __init__(self, method: str, metrics: Metrics) -> None:
        self.fields: dict[str, object] = {"method": method}
        # Who the call is for (see ``callers.py``); the service names it.
        self.caller = "anonymous"
        # The RPC's span, when tracing is on.
        self.span: Span | None = None
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
        if self.span is not None:
            self._end_span(self.span, code, model)
        if not log.is_enabled_for(logging.INFO):  # skip the work when the line is dropped
            return
        write_info(
            "rpc_finished",
            {"code": code.name, "duration_ms": round(seconds * 1000, 3), **self.fields},
        )

    def describe_span(self) -> tuple[str, dict[str, Any]]:
        """The RPC span's name and the attributes known at its start (RPC conventions)."""
        method = str(self.fields["method"])
        return f"{SERVICE_NAME}/{method}", {
            "rpc.system": "connect_rpc" if self.protocol == "connect" else "grpc",
            "rpc.service": SERVICE_NAME,
            "rpc.method": method,
            "embedgate.protocol": self.protocol,
            "embedgate.caller": self.caller,
        }

    def _end_span(self, span: Span, code: grpc.StatusCode, model: str) -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if model and model == self.metrics.model_label(model):
            span.set_attribute("embedgate.model", model)
        for key in ("inputs", "cached_inputs", "tokens"):
            value = self.fields.get(key)
            if isinstance(value, int):
                span.set_attribute(f"embedgate.{key}", value)
        if code in _SERVER_ERRORS:
            span.set_status(StatusCode.ERROR, code.name)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What the RPC sends back in trailing metadata: its request id and trace id."""
        sent = ((REQUEST_ID_HEADER, self.request_id),) if self.request_id else ()
        trace = trace_id(self.span)
        return (*sent, (TRACE_ID_HEADER, trace)) if trace else sent
