"""Log lines never carry a credential, whatever key or value it hides in."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
import structlog

from embedgate.server.logs import REDACTED, configure_logging, redact, write_info

CANARY = "sk-canary-7f3a9b"


def test_redaction_hides_secret_keys_and_bearer_values() -> None:
    """Keys that name a credential, and bearer values anywhere, are redacted; token
    counts are not."""
    event = redact(
        None,
        "info",
        {
            "api_key": CANARY,
            "headers": {"Authorization": f"Bearer {CANARY}", "accept": "application/json"},
            "detail": f"vendor said: bad header Bearer {CANARY}",
            "access_token": CANARY,
            "prompt_tokens": 12,
            "max_tokens": 256,
        },
    )
    assert CANARY not in json.dumps(event)
    assert event["api_key"] == REDACTED
    assert event["headers"]["accept"] == "application/json"
    assert (event["prompt_tokens"], event["max_tokens"]) == (12, 256)


def test_rendered_json_lines_carry_no_canary(capsys: pytest.CaptureFixture[str]) -> None:
    """The configured pipeline renders JSON with the redaction applied."""
    configure_logging(json=True)
    try:
        structlog.get_logger("t").info("vendor_call", authorization=f"Bearer {CANARY}", model="m")
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        structlog.reset_defaults()
    record = json.loads(line)
    assert record["event"] == "vendor_call"
    assert record["model"] == "m"
    assert CANARY not in line


def test_access_lines_match_the_chain_and_keep_their_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The access line, written straight to the stream, reads as structlog's chain
    renders any other line (its fields, then event, level and a UTC timestamp), with
    the same redaction; the lines of one turn of the loop go out at its end, and any
    other line logged meanwhile comes after them, not before."""

    async def one_turn() -> list[str]:
        write_info("rpc_finished", {"code": "OK", "model": f"Bearer {CANARY}", "inputs": 2})
        write_info(
            "rpc_finished", {"code": "OK", "api_key": CANARY, "detail": [f"Bearer {CANARY}"]}
        )
        waiting = capsys.readouterr().err
        structlog.get_logger("t").warning("something_else", model="m")
        await asyncio.sleep(0)
        return [waiting, *capsys.readouterr().err.strip().splitlines()]

    configure_logging(json=True)
    structlog.configure(cache_logger_on_first_use=False)
    try:
        waiting, *lines = asyncio.run(one_turn())
    finally:
        structlog.reset_defaults()
    assert waiting == ""  # both access lines waited for the end of the turn
    first, second, other = (json.loads(line) for line in lines)
    assert [first["event"], second["event"], other["event"]] == [
        "rpc_finished",
        "rpc_finished",
        "something_else",
    ]
    assert list(first) == ["code", "model", "inputs", "event", "level", "timestamp"]
    assert list(other)[-3:] == ["event", "level", "timestamp"]
    assert (first["level"], first["inputs"], second["api_key"]) == ("info", 2, REDACTED)
    assert CANARY not in "".join(lines)
    stamp = datetime.strptime(first["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_access_lines_go_through_structlog_when_it_is_configured_otherwise() -> None:
    """A test capturing logs (or console lines) sees the access line like any other."""
    configure_logging(json=True)
    # Module loggers would otherwise keep this configuration after the test ends.
    structlog.configure(cache_logger_on_first_use=False)
    try:
        with structlog.testing.capture_logs() as logs:
            write_info("rpc_finished", {"code": "OK", "inputs": 1})
    finally:
        structlog.reset_defaults()
    assert logs == [{"event": "rpc_finished", "code": "OK", "inputs": 1, "log_level": "info"}]
