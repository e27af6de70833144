"""OpenTelemetry traces: off unless configured, through the OpenTelemetry SDK and its
OTLP exporters (a maintained exporter and sampler, not a hand-written one).

On when ``tracing.enabled`` says so, or (left unset) when ``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` keeps it
off. The SDK reads the other standard variables itself (``OTEL_EXPORTER_OTLP_*``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``,
``OTEL_BSP_*``); the ``tracing`` section's keys, where given, win.

Off, every function here returns at its first line (``active()`` is one global read)
and the SDK is never imported: tracing costs nothing. On, the spans are: the RPC's own
(a server span, its parent from the caller's W3C ``traceparent``), validation, the
cache lookup, the wait for a batch, the batch (linked to every caller whose inputs it
carries), a deployment's turn, the vendor request (GenAI conventions) and each of its
attempts (HTTP client conventions, ``traceparent`` sent to the vendor), and the local
model's forward pass. Attributes are counts, names and codes, never a caller's input
or a key; exceptions are not recorded (their messages may quote a caller's values).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from embedgate.server.config import TracingConfig

TRACE_ID_HEADER = "x-trace-id"
_PROPAGATOR = TraceContextTextMapPropagator()
_NOTHING: nullcontext[None] = nullcontext()


class _Tracing:
    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("embedgate")


_state: _Tracing | None = None


def active() -> bool:
    return _state is not None


def wanted(settings: TracingConfig, environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether tracing is on for these settings and this environment."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if settings.enabled is not None:
        return settings.enabled
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _exporter(settings: TracingConfig, env: MutableMapping[str, str]) -> Any:
    protocol = (
        settings.protocol
        or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    endpoint = settings.endpoint
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        if endpoint is None:
            return GrpcExporter()
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    if protocol != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    if endpoint is None:
        return HttpExporter()
    # The variable names the collector; the exporter wants the traces' own path.
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


def start(settings: TracingConfig, environ: MutableMapping[str, str] | None = None) -> bool:
    """Turn tracing on when the settings or the environment ask for it; whether it is."""
    global _state
    env = os.environ if environ is None else environ
    if _state is not None or not wanted(settings, env):
        return _state is not None
    # Imported here: a server without tracing never loads the SDK.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    attributes: dict[str, str] = {}
    if settings.service_name is not None:
        attributes["service.name"] = settings.service_name
    elif not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "embedgate"
    sampler = (
        ParentBased(TraceIdRatioBased(settings.sample_ratio))
        if settings.sample_ratio is not None
        else None  # the SDK's: OTEL_TRACES_SAMPLER[_ARG], else parent-based always-on
    )
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings, env)))
    _state = _Tracing(provider)
    return True


# How long the last spans may take to leave at shutdown.
FLUSH_TIMEOUT_MS = 5000


def stop() -> None:
    """Turn tracing off and send what is left (blocking: run it off the event loop)."""
    global _state
    state, _state = _state, None
    if state is not None:
        state.provider.force_flush(FLUSH_TIMEOUT_MS)
        state.provider.shutdown()


# Attributes a span passes down to the spans made under it (a vendor request's GenAI
# attributes, to each of its HTTP attempts).
_INHERITED: ContextVar[dict[str, Any] | None] = ContextVar("embedgate_span_inherits", default=None)


@contextmanager
def passing_down(attributes: dict[str, Any]) -> Iterator[None]:
    """Within the block, ``inherited()`` gives ``attributes``, over what an outer block
    passes down (nothing when off)."""
    if _state is None:
        yield
        return
    token = _INHERITED.set({**inherited(), **attributes})
    try:
        yield
    finally:
        _INHERITED.reset(token)


def inherited() -> dict[str, Any]:
    return _INHERITED.get() or {}


def _remote_parent(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    carrier = {
        key: value
        for key, value in metadata or ()
        if key in ("traceparent", "tracestate") and isinstance(value, str)
    }
    return _PROPAGATOR.extract(carrier) if carrier else None


def server_span(
    metadata: Iterable[tuple[str, str | bytes]] | None,
    describe: Callable[[], tuple[str, dict[str, Any]]],
) -> Any:
    """The span of one RPC, as a context manager giving the span: its parent the
    caller's ``traceparent`` if it sent one, its name and attributes from ``describe``
    (called only when tracing is on; off, the context gives None and costs nothing)."""
    state = _state
    if state is None:
        return _NOTHING
    name, attributes = describe()
    return state.tracer.start_as_current_span(
        name,
        context=_remote_parent(metadata),
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def span(
    name: str,
    attributes: dict[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: SpanContext | None = None,
    links: Iterable[SpanContext | None] = (),
) -> Any:
    """A child span of the current one (or of ``parent``), as a context manager giving
    the span; when tracing is off, one that gives None and costs nothing."""
    state = _state
    if state is None:
        return _NOTHING
    return state.tracer.start_as_current_span(
        name,
        context=trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None,
        kind=kind,
        attributes=attributes,
        links=[Link(context) for context in distinct(links)],
        record_exception=False,
        set_status_on_exception=False,
    )


def distinct(contexts: Iterable[SpanContext | None]) -> list[SpanContext]:
    """The valid span contexts among ``contexts``, each once, in order (none when
    tracing is off: nothing is read)."""
    if _state is None:
        return []
    seen: dict[tuple[int, int], SpanContext] = {}
    for context in contexts:
        if context is not None and context.is_valid:
            seen.setdefault((context.trace_id, context.span_id), context)
    return list(seen.values())


def current() -> SpanContext | None:
    """The current span's context (None when tracing is off or no span is current)."""
    if _state is None:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def link(to: Span | None, contexts: Iterable[SpanContext | None]) -> None:
    """Add to span ``to`` a link to each of ``contexts`` (the batches a caller's inputs
    went in: its trace shows them)."""
    if to is None:
        return
    for context in distinct(contexts):
        to.add_link(context)


def inject(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` with the current span's ``traceparent`` (and ``tracestate``): a copy
    when tracing is on, ``headers`` themselves when off."""
    if _state is None:
        return headers
    sent = dict(headers)
    _PROPAGATOR.inject(sent)
    return sent


def trace_id(span: Span | None) -> str:
    """The span's trace id as the ``x-trace-id`` it is told to the caller as ("": none)."""
    if span is None:
        return ""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
