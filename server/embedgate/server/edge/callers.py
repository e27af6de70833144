"""Who each call is for, what it used, and the limits of its caller.

A caller is its bearer token's name when the server has ``auth``; otherwise the name
it gives in the ``callers.header`` metadata (an HTTP header on the HTTP doors), else
``anonymous``. The metrics' ``caller`` label shows configured names only (a token's, or
one of ``callers.names``): any other given name is counted as ``(other)``, so no caller
can grow the label set.

Limits (``rate_limit``, ``input_limit``, ``token_limit``) are windows of the same quota
store as the deployments' vendor quotas, shared by every replica through its Redis. A
call takes one unit of its caller's call limit, its inputs from the input limit (cache
hits too: they are inputs), and an estimate of its tokens from the token limit, all at
once or none; when the call ends, the token window is settled with what was really
embedded (cache hits cost none; a failed call gives its estimate back). A limit with no
room refuses the call at once, before any work: ``CALLER_QUOTA_EXCEEDED``, saying which
limit and when there will be room.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from embedgate.server.config import CALLER_HEADER, CallerLimits
from embedgate.server.domain import Input, estimate_tokens
from embedgate.server.edge.access import Access, metadata_value
from embedgate.server.edge.guard import current_caller
from embedgate.server.errors import CallerQuotaExceededError, QuotaViolation, echo
from embedgate.server.metrics import Metrics
from embedgate.server.quotas import Ask, Rate, Store, Taken
from embedgate.server.routing.embedding import Encoded
from embedgate.server.routing.model import Model

ANONYMOUS = "anonymous"
OTHER = "(other)"
# The longest given name the access line repeats.
NAME_LIMIT = 64


@dataclass(frozen=True, slots=True)
class CallerLimit:
    """One of a caller's limits, as the store knows it and as the caller is told."""

    setting: str  # rate_limit, input_limit, token_limit
    key: str
    rate: Rate
    unit: str  # calls, inputs, tokens

    def ask(self, cost: int) -> Ask:
        return self.rate.ask(self.key, cost)


def limits_of(name: str, settings: CallerLimits) -> tuple[CallerLimit, ...]:
    """A caller's limits, as the quota store keys them."""
    # A Redis hash tag: one caller's limits share a cluster slot.
    prefix = f"embedgate:caller:{{{name}}}"
    found = []
    for setting, unit in (
        ("rate_limit", "calls"),
        ("input_limit", "inputs"),
        ("token_limit", "tokens"),
    ):
        text = getattr(settings, setting)
        if text is not None:
            found.append(CallerLimit(setting, f"{prefix}:{unit}", Rate.parse(text), unit))
    return tuple(found)


class Bill:
    """What one call used, told to its caller's metrics and limits when it ends."""

    __slots__ = (
        "deployments",
        "estimate",
        "inputs",
        "items",
        "model",
        "model_requests",
        "name",
        "taken",
        "tokens",
        "vendor",
    )

    def __init__(self, name: str, model: str, vendor: bool, inputs: Sequence[Input]) -> None:
        self.name = name
        self.model = model
        # The model is a vendor's (its requests are vendor requests), not in-process.
        self.vendor = vendor
        self.inputs = inputs
        # The tokens taken from the caller's token limit, and the takes to settle.
        self.estimate = 0
        self.taken: tuple[tuple[CallerLimit, ...], Taken] | None = None
        # What the call came to (set by ``embedded``; untouched: it failed).
        self.items: Sequence[Encoded | None] = ()
        self.deployments: Sequence[str] = ()
        self.tokens = 0
        self.model_requests = 0

    def embedded(
        self,
        *,
        tokens: int | None,
        model_requests: int,
        items: Sequence[Encoded | None] = (),
        deployments: Sequence[str] = (),
    ) -> None:
        """The call's outcome: the tokens the model counted (None: unknown, then
        estimated from the inputs it was sent), the model requests that carried them,
        and each input's vector and where it came from (``items``, in the inputs'
        order, None where one failed; a rerank has none, only the ``deployments`` that
        served it)."""
        self.items = items
        self.deployments = deployments
        self.model_requests = model_requests
        if tokens is None:
            sent = (
                [self.inputs[i] for i, item in enumerate(items) if item and not item.cached]
                if items
                else self.inputs
            )
            tokens = estimate_tokens(sent) if sent else 0
        self.tokens = tokens


class _Billing:
    """``Callers.billed``'s context: a class rather than a generator, as it wraps every
    call that embeds."""

    __slots__ = ("_access", "_bill", "_callers")

    def __init__(self, callers: Callers, access: Access, bill: Bill) -> None:
        self._callers = callers
        self._access = access
        self._bill = bill

    async def __aenter__(self) -> Bill:
        await self._callers._open(self._bill)
        return self._bill

    async def __aexit__(self, *_exc: object) -> None:
        await self._callers._close(self._bill, self._access)


class Callers:
    """The callers a server knows: how a call's caller is told, its label in the
    metrics, its limits (in ``store``) and the prices of each model's deployments
    (``prices[model][deployment]``, per million tokens; deployment "" is a model's one
    endpoint)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        header: str = CALLER_HEADER,
        known: Mapping[str, CallerLimits] | None = None,
        store: Store | None = None,
        prices: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self._metrics = metrics
        self._header = header
        self._known = frozenset(known or ())
        self._limits = {
            name: limits
            for name, settings in (known or {}).items()
            if (limits := limits_of(name, settings))
        }
        if self._limits and store is None:
            raise ValueError("callers have limits: give the store that counts them")
        self._store = store
        self._prices = prices or {}

    @property
    def header(self) -> str:
        """Where a caller gives its name when the server has no auth."""
        return self._header

    def name_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller of a call with ``metadata``: its token's name, else the name it
        gives, else anonymous."""
        caller = current_caller()
        if caller is not None:
            return caller.name
        given = metadata_value(metadata, self._header)
        return echo(given, NAME_LIMIT) if given else ANONYMOUS

    def label(self, name: str) -> str:
        return name if name in self._known or name == ANONYMOUS else OTHER

    def billed(self, access: Access, model: Model, inputs: Sequence[Input]) -> _Billing:
        """As ``async with``: admit a call of ``access.caller`` to ``model`` with
        ``inputs`` against the caller's limits (or raise ``CallerQuotaExceededError``),
        and count what it used when it ends, whether it succeeds or fails."""
        return _Billing(
            self, access, Bill(access.caller, model.name, not model.info.in_process, inputs)
        )

    async def _open(self, bill: Bill) -> None:
        limits = self._limits.get(bill.name)
        if limits:
            await self._take(bill, limits)

    async def _close(self, bill: Bill, access: Access) -> None:
        if bill.taken is not None:
            await self._settle(bill, *bill.taken)
        self._count(bill, access)

    async def _take(self, bill: Bill, limits: tuple[CallerLimit, ...]) -> None:
        assert self._store is not None  # checked when limits were given
        estimate = estimate_tokens(bill.inputs)
        costs = {"calls": 1, "inputs": len(bill.inputs), "tokens": estimate}
        asks = [limit.ask(costs[limit.unit]) for limit in limits]
        taken = await self._store.take(asks)
        if not taken.granted:
            self._refuse(bill.name, limits, taken)
        bill.estimate = estimate
        bill.taken = (limits, taken)

    def _refuse(self, name: str, limits: tuple[CallerLimit, ...], taken: Taken) -> None:
        spent = [limit for limit, wait in zip(limits, taken.waits, strict=True) if wait]
        wait = max(taken.waits) + 0.001
        for limit in spent:
            self._metrics.caller_quota_refusals.labels(self.label(name), limit.setting).inc()
        what = ", ".join(f"{limit.setting} of {limit.rate.text} {limit.unit}" for limit in spent)
        raise CallerQuotaExceededError(
            f"caller {name!r} has spent its {what}; there is room again in {wait:.3g} s",
            violations=[
                QuotaViolation(f"caller:{name}", f"{limit.setting}: {limit.rate.text} {limit.unit}")
                for limit in spent
            ],
            retry_after_s=wait,
            metadata={"caller": name, "limit": ",".join(limit.setting for limit in spent)},
        )

    async def _settle(self, bill: Bill, limits: tuple[CallerLimit, ...], taken: Taken) -> None:
        """Correct the token window by what the call really embedded."""
        assert self._store is not None  # it took from the store
        for limit, bucket in zip(limits, taken.buckets, strict=True):
            if limit.unit != "tokens":
                continue
            ask = limit.ask(bill.estimate)
            if bill.tokens != ask.cost:
                await self._store.settle(ask, bucket, bill.tokens - ask.cost, local=taken.local)

    def _count(self, bill: Bill, access: Access) -> None:
        cached = sum(item.cached for item in bill.items if item is not None)
        access.fields["tokens"] = bill.tokens
        self._metrics.caller_used(
            self.label(bill.name),
            bill.model,
            inputs=len(bill.inputs),
            cached=cached,
            tokens=bill.tokens,
            model_requests=bill.model_requests,
            cost=self._cost(bill),
            vendor=bill.vendor,
        )

    def _cost(self, bill: Bill) -> float | None:
        """What the call's tokens cost at its deployments' prices (None: no price set).
        Tokens the model counted per input are priced where each went; the rest are
        shared out evenly among the inputs that were sent."""
        prices = self._prices.get(bill.model)
        if not prices:
            return None
        if not bill.tokens:
            return 0.0
        if not bill.items:  # a rerank: priced where it was served
            where = bill.deployments[0] if bill.deployments else ""
            return bill.tokens * prices.get(where, prices.get("", 0.0)) / 1e6
        sent = [item for item in bill.items if item is not None and not item.cached]
        known = sum(item.tokens or 0 for item in sent)
        unknown = [item for item in sent if item.tokens is None]
        share = max(0, bill.tokens - known) / len(unknown) if unknown else 0.0
        total = 0.0
        for item in sent:
            tokens = item.tokens if item.tokens is not None else share
            total += tokens * prices.get(item.deployment, prices.get("", 0.0))
        return total / 1e6
