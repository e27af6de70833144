"""A model served by several deployments of one vector space.

It is the model's provider: the batching queue hands it each vendor request, and it
sends that request to one deployment (``balance.choose``), trying another when an
attempt fails on the vendor's side, within the caller's deadline. Each deployment has a
breaker (``breaker.py``): one that keeps failing is out of service, then probed. A call
never goes to another model: a vector is only of use in the space it came from.

Each deployment is a vendor provider that makes one attempt per request (its own retries
are off): the retries happen here, where there is somewhere else to go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from embedgate.server import tracing
from embedgate.server.config import ConfigError, DeployedModelSettings
from embedgate.server.deadlines import current_deadline
from embedgate.server.domain import (
    DeploymentState,
    DeploymentStatus,
    EmbedOptions,
    Image,
    ImageInput,
    Input,
    Modality,
    ModelInfo,
    TextInput,
)
from embedgate.server.errors import (
    EmbedgateError,
    NoDeploymentError,
    Problem,
    QuotaExhaustedError,
    VendorAuthError,
    VendorBadReplyError,
    VendorError,
    VendorRateLimitedError,
    VendorUnavailableError,
)
from embedgate.server.health import Health, ModelHealth
from embedgate.server.metrics import Metrics
from embedgate.server.providers.base import EmbedBatch, Provider, Vectors
from embedgate.server.providers.http import RetryPolicy
from embedgate.server.providers.settings import SettingError, VendorSettings
from embedgate.server.routing.balance import Member, choose, ready_at
from embedgate.server.routing.breaker import Breaker, BreakerPolicy, Clock, State

log = structlog.get_logger("embedgate.deployments")

Sleep = Callable[[float], Awaitable[None]]
# What the caller sees of a model: every deployment must give the same.
AGREED = ("dimensions", "modalities", "normalizes_by_default", "accepts_instruction", "embeds")


@dataclass(eq=False, slots=True)
class Deployment:
    provider: Provider
    member: Member


def agreed_info(name: str, space: str | None, infos: Sequence[tuple[str, ModelInfo]]) -> ModelInfo:
    """The model as callers see it, from its deployments' own descriptions; raises
    ``SettingError`` on the first key a deployment differs from the first one in."""
    first_name, first = infos[0]
    for position, (other_name, other) in enumerate(infos[1:], start=1):
        for key in AGREED:
            if getattr(first, key) != getattr(other, key):
                raise SettingError(
                    f"deployments[{position}].{key}",
                    f"deployment {other_name!r} differs from {first_name!r} in {key}: every "
                    "deployment of a model must give the caller the same vectors",
                )
    providers = sorted({info.provider for _, info in infos})
    return ModelInfo(
        name=name,
        provider=",".join(providers),
        modalities=first.modalities,
        # What every deployment takes.
        max_inputs_per_call=min(info.max_inputs_per_call for _, info in infos),
        dimensions=first.dimensions,
        max_text_chars=min(info.max_text_chars for _, info in infos),
        embeds=first.embeds,
        reranks=first.reranks,
        native_rerank=False,  # a vendor's reranker is one deployment's, not the space's
        accepts_instruction=first.accepts_instruction,
        normalizes_by_default=first.normalizes_by_default,
        # Vectors of one space are interchangeable: the cache is shared by every
        # deployment of the model.
        source=f"space {space or name}",
        space=space or "",
    )


class DeploymentSet:
    """Implements the provider seam for a model with deployments."""

    def __init__(
        self,
        info: ModelInfo,
        deployments: Sequence[Deployment],
        *,
        health: ModelHealth,
        metrics: Metrics | None = None,
        retries: RetryPolicy | None = None,
        space_check: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._info = info
        self._deployments = list(deployments)
        self._by_member = {d.member: d for d in self._deployments}
        self._members = [d.member for d in self._deployments]
        self._health = health
        self._requests = (metrics or Metrics()).deployment_requests
        self._retries = retries or RetryPolicy()
        # The least cosine a probe may have between deployments; None: not checked.
        self.space_check = space_check
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._waiting = 0
        # Each deployment's last refusal by its own quota: it waits until its
        # ``waiting_until``.
        self._full: dict[Member, QuotaExhaustedError] = {}

    @staticmethod
    def breaker(
        model: str,
        deployment: str,
        policy: BreakerPolicy,
        metrics: Metrics,
        clock: Clock = time.monotonic,
    ) -> Breaker:
        """A deployment's breaker, its changes logged and metered."""
        gauge = metrics.deployment_breaker_state.labels(model, deployment)
        gauge.set(State.CLOSED.value)

        def moved(old: State, new: State) -> None:
            gauge.set(new.value)
            metrics.deployment_breaker_transitions.labels(model, deployment, new.name.lower()).inc()
            log.warning(
                "deployment_breaker",
                model=model,
                deployment=deployment,
                state=new.name.lower(),
                was=old.name.lower(),
            )

        return Breaker(policy, clock=clock, on_transition=moved)

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def verify_space(self, min_cosine: float) -> None:
        """Embed the probes through every deployment and compare each one's vectors with
        the first's; ``ConfigError`` names the two deployments, the probe and the cosine
        when one is below ``min_cosine``, or the deployment that could not answer."""
        name = self._info.name
        probes = probe_inputs(self._info)
        seen: list[tuple[str, Vectors]] = []
        for deployment in self._deployments:
            rows = []
            for position, probe in enumerate(probes):
                options = EmbedOptions(normalize=True, request_id=f"space-check-{position}")
                try:
                    batch = await deployment.provider.embed([probe], options)
                except EmbedgateError as error:
                    raise ConfigError(
                        f"model {name}: space check: deployment {deployment.member.name!r} "
                        f"could not embed the probes: {error}"
                    ) from None
                vector = batch.vectors[0].astype(np.float64)
                rows.append(vector / (np.linalg.norm(vector) or 1.0))
            seen.append((deployment.member.name, np.stack(rows)))
        first_name, first = seen[0]
        for other_name, other in seen[1:]:
            for probe, a, b in zip(probes, first, other, strict=True):
                cosine = float(a @ b)
                if cosine < min_cosine:
                    raise ConfigError(
                        f"model {name}: space check: deployments {first_name!r} and "
                        f"{other_name!r} give different vectors for probe {_describe(probe)}: "
                        f"cosine {cosine:.4f}, below space_check_min_cosine {min_cosine}"
                    )
        log.info("space_check_passed", model=name, deployments=len(seen), probes=len(probes))

    def statuses(self) -> tuple[DeploymentStatus, ...]:
        """Each deployment and whether it takes requests now."""
        now = self._clock()
        return tuple(
            DeploymentStatus(d.member.name, d.provider.info.provider, _state(d.member, now))
            for d in self._deployments
        )

    @property
    def max_batch(self) -> int:
        """What every deployment takes in one request."""
        return min(d.provider.max_batch for d in self._deployments)

    @property
    def waiting(self) -> int:
        return self._waiting + sum(d.provider.waiting for d in self._deployments)

    async def start(self) -> None:
        await asyncio.gather(*(d.provider.start() for d in self._deployments))

    async def close(self) -> None:
        await asyncio.gather(*(d.provider.close() for d in self._deployments))

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        """Every deployment's own limits: a request may go to any of them."""
        found: dict[tuple[int | None, str], Problem] = {}
        for deployment in self._deployments:
            for problem in await deployment.provider.check(inputs, options):
                found.setdefault((problem.index, problem.part.value), problem)
        return list(found.values())

    async def embed(self, inputs: Sequence[Input], options: EmbedOptions) -> EmbedBatch:
        loop = asyncio.get_running_loop()
        deadline = current_deadline()
        tried: list[Member] = []
        attempts = 0
        last: VendorError | None = None
        while True:
            # One reading of the clock for the whole decision: a deployment whose wait
            # ends between two readings would be neither chosen nor waited for.
            now = self._clock()
            member = choose(self._members, now, avoid=tried, rng=self._rng)
            if member is None or not member.breaker.allow():
                wait = self._wait_for_retry_after(now, loop.time(), deadline)
                if wait is not None:
                    self._waiting += 1
                    try:
                        await self._sleep(wait)
                    finally:
                        self._waiting -= 1
                    continue
                full = self._waiting_for_quota(now)
                if full:
                    raise self._exhausted(full, now)
                none = self._none_usable(now)
                # A call that has tried hears its vendor's last answer.
                raise last or none
            member.in_flight += 1
            try:
                state = member.breaker.state.name.lower() if tracing.active() else ""
                with (
                    tracing.span(
                        "embedgate.deployment",
                        {
                            "embedgate.deployment": member.name,
                            "embedgate.breaker_state": state,
                            "embedgate.attempt": attempts + 1,
                        },
                    ),
                    tracing.passing_down({"embedgate.breaker_state": state}),
                ):
                    batch = await self._by_member[member].provider.embed(inputs, options)
            except QuotaExhaustedError as error:
                # No room in its quota: waiting, like a vendor's 429, not broken.
                member.breaker.released()
                member.waiting_until = self._clock() + (error.retry_after_s or 0.0)
                self._full[member] = error
                continue
            except VendorError as error:
                attempts += 1
                last = error
                self._count(member, error.reason.lower())
                retry = self._judge(member, error)
                if not retry or attempts > self._retries.max_retries:
                    raise
                tried.append(member)
                delay = self._delay(tried, error, attempts)
                if deadline is not None and loop.time() + delay >= deadline:
                    raise
                log.warning(
                    "deployment_retry",
                    model=self._info.name,
                    deployment=member.name,
                    attempt=attempts,
                    wait_s=round(delay, 3),
                    reason=error.reason,
                )
                if delay > 0:
                    await self._sleep(delay)
                continue
            except BaseException:
                member.breaker.released()  # cancelled or out of time: no verdict
                raise
            finally:
                member.in_flight -= 1
            member.breaker.succeeded()
            self._health.succeeded()
            self._count(member, "ok")
            return dataclasses.replace(batch, deployment=member.name)

    def _count(self, member: Member, outcome: str) -> None:
        self._requests.labels(self._info.name, member.name, outcome).inc()

    def _wait_for_retry_after(
        self, clock: float, now: float, deadline: float | None
    ) -> float | None:
        """When no deployment is usable only because some wait out a vendor's
        Retry-After or for room in their quota (their breakers are fine), how long until
        the first may go again, if that is within the caller's deadline; else None. Open
        breakers are never waited for: then the call fails at once. ``clock`` is the
        balancer's time, ``now`` the event loop's."""
        waiting = [
            m.waiting_until - clock
            for m in self._members
            if m.waiting_until > clock and m.breaker.usable()
        ]
        if not waiting:
            return None
        wait = min(waiting)
        if deadline is not None and now + wait >= deadline:
            return None
        return wait

    def _judge(self, member: Member, error: VendorError) -> bool:
        """Record what ``error`` says of the deployment; whether another attempt may help."""
        if isinstance(error, VendorAuthError):
            member.breaker.trip()
            return True
        if isinstance(error, VendorRateLimitedError) and error.retry_after_s is not None:
            # Waiting, not broken: the breaker does not count it.
            member.waiting_until = self._clock() + error.retry_after_s
            self._full.pop(member, None)
            member.breaker.released()
            return True
        if isinstance(error, VendorUnavailableError | VendorBadReplyError | VendorRateLimitedError):
            now = self._clock()
            alone = not any(m.usable(now) for m in self._members if m is not member)
            member.breaker.failed(last=alone)
            return True
        member.breaker.released()  # the vendor answered: the request was at fault
        return False

    def _delay(self, tried: Sequence[Member], error: VendorError, attempts: int) -> float:
        """None when another deployment can take the request now; else what the vendor
        asked for, or jittered backoff."""
        now = self._clock()
        other = choose(self._members, now, avoid=tried, rng=self._rng)
        if other is not None and other not in tried:
            return 0.0
        if error.retry_after_s is not None:
            return error.retry_after_s
        return self._retries.backoff(attempts, self._rng)

    def _waiting_for_quota(self, now: float) -> dict[Member, QuotaExhaustedError]:
        """The deployments waiting for room in their own quota, with what it said."""
        return {
            member: error
            for member, error in self._full.items()
            if member.waiting_until > now and member.breaker.usable()
        }

    def _exhausted(
        self, full: dict[Member, QuotaExhaustedError], now: float
    ) -> QuotaExhaustedError:
        """No deployment the call could use has room in its quota in time."""
        wait = max(0.0, min(member.waiting_until for member in full) - now)
        name = self._info.name
        spent = "; ".join(
            f"{member.name!r}: " + ", ".join(v.description for v in error.violations)
            for member, error in full.items()
        )
        return QuotaExhaustedError(
            f"no deployment of model {name} has room in its vendor quota within the "
            f"call's deadline ({spent}); room again in {wait:.2f} s",
            retry_after_s=wait,
            metadata={"model": name, "deployments": ",".join(m.name for m in full)},
            violations=[v for error in full.values() for v in error.violations],
        )

    def _none_usable(self, now: float) -> NoDeploymentError:
        wait = max(0.0, ready_at(self._members, now) - now)
        self._health.out_of_service()
        name = self._info.name
        return NoDeploymentError(
            f"every deployment of model {name} is out of service; the first may take "
            f"requests again in {wait:.1f} s",
            metadata={"model": name, "deployments": str(len(self._members))},
            retry_after_s=wait,
        )


# Inputs every deployment of a space must embed alike: prose, a name and digits, and
# another script.
PROBE_TEXTS = (
    "The cat sat on the mat.",
    "embedgate routes embedding requests to vendors",
    "Order 42, shipped 2026-11-29",
    "北京是中国的首都",
)


def _png(size: int = 8) -> bytes:
    """A small RGB gradient as a PNG, made here: the image probe."""
    rows = b"".join(
        b"\x00" + bytes(channel for x in range(size) for channel in (x * 32, y * 32, 128))
        for y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PROBE_IMAGE = Image(data=_png(), mime_type="image/png")


def probe_inputs(info: ModelInfo) -> list[Input]:
    """The probes for a model: the texts, and an image when it takes images."""
    probes: list[Input] = [
        TextInput(text) for text in PROBE_TEXTS if Modality.TEXT in info.modalities
    ]
    if Modality.IMAGE in info.modalities:
        probes.append(ImageInput(PROBE_IMAGE))
    return probes


def _describe(probe: Input) -> str:
    if isinstance(probe, TextInput):
        return repr(probe.text)
    return "(the probe image)"


def _state(member: Member, now: float) -> DeploymentState:
    breaker = member.breaker.state
    if breaker is State.OPEN or now < member.waiting_until:
        return DeploymentState.OUT_OF_SERVICE
    if breaker is State.HALF_OPEN:
        return DeploymentState.PROBING
    return DeploymentState.IN_SERVICE


def assemble(
    model: DeployedModelSettings[Any],
    members: Sequence[tuple[VendorSettings, Provider]],
    health: Health,
    metrics: Metrics,
) -> DeploymentSet:
    """A deployed model from its settings and its deployments' providers (each making
    one attempt per request); ``SettingError`` if they would give callers different
    vectors."""
    info = agreed_info(model.name, model.space, [(s.name, p.info) for s, p in members])
    settings = model.breaker
    policy = BreakerPolicy(
        failures=settings.failures,
        open_s=settings.open_s,
        window=max(BreakerPolicy().window, settings.failures),
    )
    deployments = [
        Deployment(
            provider,
            Member(
                own.name,
                DeploymentSet.breaker(model.name, own.name, policy, metrics),
                weight=own.weight,
                priority=own.priority,
            ),
        )
        for own, provider in members
    ]
    first = model.deployments[0]
    # How many more attempts a request may make, and the backoff when none of the other
    # deployments can take it at once (each attempt's own limit is its deployment's).
    retries = RetryPolicy(
        max_retries=max(own.max_retries for own, _ in members),
        backoff_initial_s=first.retry_backoff_s,
        backoff_max_s=first.retry_backoff_max_s,
    )
    return DeploymentSet(
        info,
        deployments,
        health=health.model(model.name),
        metrics=metrics,
        retries=retries,
        space_check=model.space_check_min_cosine if model.space_check else None,
    )
