"""Structured logs: JSON lines by default, readable lines on a terminal.

A redaction step runs before the renderer so that no credential can reach a log line,
whatever a caller or a library put into the event.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, BinaryIO

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


def _scrub_text(value: str) -> str:
    if _SECRET_VALUES.search(value) is None:
        return value
    return _SECRET_VALUES.sub(lambda m: m.group(1) + REDACTED, value)


def _scrub(value: Any) -> Any:
    kind = type(value)
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _secret_key(k) else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # The kinds every access line is made of are judged here, without a call each:
    # the line has a dozen fields, and a call per field cost more than the search.
    for key, value in event.items():
        kind = type(value)
        if _secret_key(key):
            event[key] = REDACTED
        elif kind is str:
            if _SECRET_VALUES.search(value) is not None:
                event[key] = _scrub_text(value)
        elif kind is not int and kind is not float and value is not None:
            scrubbed = _scrub(value)
            if scrubbed is not value:
                event[key] = scrubbed
    return event


# The access line (one per RPC) skips structlog's processor chain while that chain is
# the JSON one configure_logging set: the same fields, redaction, level and timestamp,
# at a fraction of the chain's cost inside a busy server. The lines of one turn of the
# event loop go out in one write at its end (a write and a flush per line cost more
# than the line itself); at most that turn's lines wait, never longer. With any other
# configuration (console lines, a test capturing logs) the line goes through structlog
# like any other.
_DIRECT: tuple[list[Any], BinaryIO, Any] | None = None
_access_log = structlog.get_logger("embedgate.access")
_unwritten = bytearray()
# The loop at whose turn's end they will be written.
_write_scheduled: asyncio.AbstractEventLoop | None = None
# Beyond this many bytes waiting, they are written at once.
_MOST_UNWRITTEN = 1 << 16


def write_info(event: str, fields: dict[str, Any]) -> None:
    """Log ``event`` at info with ``fields`` (a dict this call may change), as
    ``structlog``'s ``info`` would. The caller has checked that info is enabled."""
    global _write_scheduled
    direct = _DIRECT
    # The chain as configured, neither replaced nor changed in place (as capture_logs
    # does): still ending in the JSON renderer.
    chain = structlog.get_config()["processors"]
    if direct is None or chain is not direct[0] or not chain or chain[-1] is not direct[2]:
        _access_log.info(event, **fields)
        return
    redact(None, "info", fields)
    fields["event"] = event
    fields["level"] = "info"
    fields["timestamp"] = utc_timestamp()
    _unwritten.extend(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop to wait for: now
        write_unwritten()
        return
    if _write_scheduled is not loop:  # (a loop that ended may have left it scheduled)
        loop.call_soon(write_unwritten)
        _write_scheduled = loop
    elif len(_unwritten) >= _MOST_UNWRITTEN:
        write_unwritten()


def write_unwritten() -> None:
    """Write the access lines waiting for the end of the loop's turn (also at exit)."""
    global _write_scheduled
    _write_scheduled = None
    if not _unwritten or _DIRECT is None:
        return
    stream = _DIRECT[1]
    try:
        stream.write(_unwritten)
        stream.flush()
    except (OSError, ValueError):  # stderr closed or gone: nothing to write to
        pass
    _unwritten.clear()


atexit.register(write_unwritten)


def _access_lines_first(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Any other line goes out after the access lines waiting: lines stay in order."""
    if _unwritten:
        write_unwritten()
    return event


_second = -1
_second_text = ""


def utc_timestamp() -> str:
    """Now, as structlog's ISO UTC stamper writes it: ``2026-01-31T12:34:56.789012Z``.
    The text of the second is kept: lines come many to a second."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_second_text}.{int((now - second) * 1_000_000):06d}Z"


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
    stream: BinaryIO | None = sys.stderr.buffer if json and hasattr(sys.stderr, "buffer") else None
    factory: Any = (
        structlog.BytesLoggerFactory(file=stream)
        if stream is not None
        else structlog.PrintLoggerFactory(file=sys.stderr)
    )
    shared: list[Any] = [
        _access_lines_first,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    global _DIRECT
    processors = [*shared, renderer]
    _DIRECT = None if stream is None else (processors, stream, renderer)
    structlog.configure(
        processors=processors,
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
