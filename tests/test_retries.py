"""The retry rules and the status table, in memory: a scripted sender plays each
attempt's outcome and the waits are recorded, not slept. (tests/test_http_transport.py
checks the same rules against a loopback vendor over real sockets.)"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from embedgate.server.deadlines import deadline_scope
from embedgate.server.domain import EmbedOptions, TextInput
from embedgate.server.errors import (
    DeadlineExceededError,
    VendorAuthError,
    VendorError,
    VendorFailedError,
    VendorNotFoundError,
    VendorRateLimitedError,
    VendorRejectedError,
    VendorUnavailableError,
)
from embedgate.server.health import Health
from embedgate.server.metrics import Metrics
from embedgate.server.providers.http import HttpReply, RetryPolicy, TransportFailure, post
from embedgate.server.providers.openai_compatible import OpenAICompatible, OpenAISettings
from embedgate.server.providers.vendor import VendorProvider, vendor_error

URL = "http://vendor.invalid/v1/embeddings"
POLICY = RetryPolicy(max_retries=2, backoff_initial_s=0.5, backoff_max_s=8, attempt_timeout_s=5)


class Hang:
    """An attempt the vendor never answers."""


Outcome = HttpReply | TransportFailure | Hang


def reply(status: int, body: Any = None, **headers: str) -> HttpReply:
    content = orjson.dumps(body if body is not None else {"error": {"message": f"m{status}"}})
    return HttpReply(status, content, {k.replace("_", "-"): v for k, v in headers.items()})


@dataclass
class ScriptedSender:
    """A sender that plays ``script``: each attempt takes the next outcome."""

    script: list[Outcome]
    sent: list[Mapping[str, str]] = field(default_factory=list)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReply:
        self.sent.append(headers)
        outcome = self.script.pop(0)
        if isinstance(outcome, Hang):
            await asyncio.Event().wait()
        if isinstance(outcome, TransportFailure):
            raise outcome
        assert isinstance(outcome, HttpReply)
        return outcome


@dataclass
class Waits:
    """Stands in for asyncio.sleep: records each wait, returns at once."""

    seconds: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.seconds.append(delay)


async def run(
    script: Sequence[Outcome], policy: RetryPolicy = POLICY, metrics: Metrics | None = None
) -> tuple[HttpReply, ScriptedSender, Waits]:
    sender, waits = ScriptedSender(list(script)), Waits()
    meter = (metrics or Metrics()).vendor("fake", "m")
    got = await post(
        sender,
        URL,
        b"{}",
        {},
        policy=policy,
        limit=asyncio.Semaphore(1),
        vendor="Fake",
        meter=meter,
        sleep=waits,
    )
    return got, sender, waits


async def test_a_reply_that_is_not_retryable_is_final_at_once() -> None:
    """200 and the 4xx that are not 408 or 429 end the call on their first attempt."""
    for status in (200, 400, 401, 404, 422):
        got, sender, waits = await run([reply(status)])
        assert (got.status, got.attempts, len(sender.sent), waits.seconds) == (status, 1, 1, [])


async def test_retryable_replies_are_retried_with_jittered_backoff() -> None:
    """408, 429 and 5xx are tried again; each wait is full jitter below an exponential
    ceiling (0.5 s, then 1 s), and the attempts are counted in the reply and the meter."""
    metrics = Metrics()
    got, sender, waits = await run([reply(503), reply(429), reply(200)], metrics=metrics)
    assert (got.status, got.attempts, len(sender.sent)) == (200, 3, 3)
    assert len(waits.seconds) == 2
    assert 0 <= waits.seconds[0] <= 0.5
    assert 0 <= waits.seconds[1] <= 1.0
    retries = metrics.registry.get_sample_value(
        "embedgate_vendor_retries_total", {"vendor": "fake", "model": "m"}
    )
    assert retries == 2


async def test_when_retries_are_spent_the_last_reply_is_the_answer() -> None:
    """After 1 + max_retries attempts, the last reply is returned as it is."""
    got, sender, waits = await run([reply(500), reply(502), reply(503)])
    assert (got.status, got.attempts, len(sender.sent), len(waits.seconds)) == (503, 3, 3, 2)


async def test_no_reply_at_all_raises_with_the_attempts_made() -> None:
    """Connection failures are retried too; when they persist, the failure is raised
    with what happened and how many attempts were made."""
    with pytest.raises(TransportFailure) as caught:
        await run([TransportFailure("ConnectError: refused")] * 3)
    assert (caught.value.description, caught.value.attempts) == ("ConnectError: refused", 3)


async def test_retry_after_is_waited_as_the_vendor_asked() -> None:
    """A Retry-After in seconds replaces the backoff, even above its ceiling."""
    got, _, waits = await run([reply(429, retry_after="12"), reply(200)])
    assert (got.status, waits.seconds) == (200, [12.0])


async def test_a_wait_that_would_pass_the_deadline_is_not_waited() -> None:
    """If the next wait ends after the caller's deadline, the vendor's answer is the
    call's answer now: no wait, no further attempt."""
    with deadline_scope(1.0):
        got, sender, waits = await run([reply(429, retry_after="5"), reply(200)])
    assert (got.status, got.attempts, len(sender.sent), waits.seconds) == (429, 1, 1, [])


async def test_an_attempt_that_hangs_is_abandoned_and_retried() -> None:
    """An attempt gets at most attempt_timeout_s; then it is a failure like any other."""
    quick = RetryPolicy(max_retries=1, backoff_initial_s=0, attempt_timeout_s=0.02)
    got, sender, _ = await run([Hang(), reply(200)], policy=quick)
    assert (got.status, got.attempts, len(sender.sent)) == (200, 2, 2)


async def test_the_deadline_ends_a_hanging_attempt_as_a_deadline() -> None:
    """When the caller's deadline comes first, the call ends as DEADLINE_EXCEEDED, not
    as a vendor failure, and is not retried."""
    with deadline_scope(0.02), pytest.raises(DeadlineExceededError):
        await run([Hang(), reply(200)])


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (400, VendorRejectedError, "VENDOR_REJECTED_REQUEST"),
        (413, VendorRejectedError, "VENDOR_REJECTED_REQUEST"),
        (422, VendorRejectedError, "VENDOR_REJECTED_REQUEST"),
        (401, VendorAuthError, "VENDOR_AUTH_FAILED"),
        (403, VendorAuthError, "VENDOR_AUTH_FAILED"),
        (404, VendorNotFoundError, "VENDOR_NOT_FOUND"),
        (408, VendorUnavailableError, "VENDOR_UNAVAILABLE"),
        (429, VendorRateLimitedError, "VENDOR_RATE_LIMITED"),
        (500, VendorUnavailableError, "VENDOR_UNAVAILABLE"),
        (599, VendorUnavailableError, "VENDOR_UNAVAILABLE"),
        (418, VendorFailedError, "VENDOR_FAILED"),
    ],
)
def test_each_http_status_is_one_error(status: int, kind: type[VendorError], reason: str) -> None:
    """The status table: each vendor status maps to one error class and reason, and
    the message quotes the vendor; building it has no side effect on its inputs."""
    metadata = {"vendor_message": "said so"}
    error = vendor_error("V answered HTTP", status, metadata, retry_after_s=3.0)
    assert type(error) is kind
    assert error.reason == reason
    assert str(error).startswith("V answered HTTP")
    assert str(error).endswith(": said so")
    assert metadata == {"vendor_message": "said so"}
    if kind is VendorRateLimitedError:
        assert isinstance(error, VendorRateLimitedError)
        assert error.retry_after_s == 3.0
        assert error.metadata["retry_after_s"] == "3"


def provider(script: Sequence[Outcome], health: Health) -> tuple[VendorProvider, ScriptedSender]:
    settings = OpenAISettings(
        name="m", vendor_model="text-embedding-3-small", max_retries=0, dimensions=4
    )
    sender = ScriptedSender(list(script))
    made = VendorProvider(
        OpenAICompatible(settings),
        sender,
        base_url=URL,
        keys=["k-123"],
        health=health.model("m"),
    )
    return made, sender


async def test_the_provider_turns_a_refused_key_into_not_serving() -> None:
    """Through a provider: a 401 is VENDOR_AUTH_FAILED and marks the model not
    serving (the operator must act); the key travels as a bearer token only."""
    health = Health()
    made, sender = provider([reply(401)], health)
    with pytest.raises(VendorAuthError) as caught:
        await made.embed([TextInput("a")], EmbedOptions(request_id="r1"))
    assert "k-123" not in str(caught.value)
    assert sender.sent[0]["authorization"] == "Bearer k-123"
    assert sender.sent[0]["x-request-id"] == "r1"
    assert not health.serving("m")


async def test_the_provider_counts_vendor_failures_toward_health() -> None:
    """Unavailable replies count toward the failures in a row that make a model not
    serving; a rejected request (the caller's fault) does not."""
    health = Health(unhealthy_after=2)
    made, _ = provider([reply(400), reply(400), reply(503), reply(503)], health)
    for expected in (VendorRejectedError, VendorRejectedError):
        with pytest.raises(expected):
            await made.embed([TextInput("a")], EmbedOptions())
    assert health.serving("m")
    for _ in range(2):
        with pytest.raises(VendorUnavailableError):
            await made.embed([TextInput("a")], EmbedOptions())
    assert not health.serving("m")
