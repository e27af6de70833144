"""Structured logs: JSON lines by default, readable lines on a terminal.

A redaction step runs before the renderer so that no credential can reach a log line,
whatever a caller or a library put into the event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

# Keys whose values are never logged, and values that look like credentials.
_SECRET_KEYS = re.compile(
    r"(authorization|api[_-]?key|secret|password|cookie|credential|(^|[_-])token$)", re.I
)
_SECRET_VALUES = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")
REDACTED = "[redacted]"


# Whether each key seen so far names a secret: log lines repeat a few dozen keys, and a
# dict lookup costs a tenth of the search. Bounded, in case keys are ever made up.
_KEY_VERDICTS: dict[str, bool] = {}
_MAX_KEY_VERDICTS = 4096


def _secret_key(key: str) -> bool:
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        verdict = _SECRET_KEYS.search(key) is not None
        if len(_KEY_VERDICTS) < _MAX_KEY_VERDICTS:
            _KEY_VERDICTS[key] = verdict
    return verdict


def _scrub(value: Any) -> Any:
    kind = type(value)
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, str):
        if _SECRET_VALUES.search(value) is None:
            return value
        return _SECRET_VALUES.sub(lambda m: m.group(1) + REDACTED, value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _secret_key(k) else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if _secret_key(key):
            event[key] = REDACTED
        else:
            scrubbed = _scrub(value)
            if scrubbed is not value:
                event[key] = scrubbed
    return event


def _json_text(value: Any, **options: Any) -> str:
    return orjson.dumps(value, **options).decode()


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Set up structlog (and route stdlib logging through the same renderer)."""
    if json is None:
        json = not sys.stderr.isatty()
    # JSON lines are rendered to bytes by orjson and written as bytes: a third of the
    # cost of the standard library's encoder and a text layer (one line per RPC).
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    factory: Any = (
        structlog.BytesLoggerFactory(file=sys.stderr.buffer)
        if json and hasattr(sys.stderr, "buffer")
        else structlog.PrintLoggerFactory(file=sys.stderr)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # The logging module writes text: the same JSON, decoded.
                structlog.processors.JSONRenderer(serializer=_json_text) if json else renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
