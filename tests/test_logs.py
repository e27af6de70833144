"""Log lines never carry a credential, whatever key or value it hides in."""

from __future__ import annotations

import json

import pytest
import structlog

from embedgate.server.logs import REDACTED, configure_logging, redact

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
