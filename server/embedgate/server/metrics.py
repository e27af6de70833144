"""Prometheus metrics.

One ``Metrics`` per gateway, with its own registry, so that several gateways in one
process (tests, embedding) keep separate counts. Providers get a ``VendorMeter`` bound
to their vendor and model, so that recording costs no label lookups on the hot path.
The ``/metrics`` listener is the edge's (``edge/server.py``); model health is
``health.py``'s, shown here as a gauge.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# Seconds: from a cache hit (~0.3 ms) to a slow multimodal vendor call.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Inputs per vendor request or local batch: vendor limits run from 1 to a few hundred.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# The model label of RPCs that named no configured model.
UNKNOWN_MODEL = "(unknown)"


# The per-caller counters: name, help. Their label names are ("caller", "model").
CALLER_COUNTERS = (
    (
        "embedgate_caller_rpcs",
        "Calls that embed or rerank (an EmbedPipeline request is one), by caller and "
        "model: the caller is its token's name, a configured name it gave, "
        "'anonymous', or '(other)' for a name not configured.",
    ),
    (
        "embedgate_caller_inputs",
        "Inputs of those calls (a rerank's documents and query), cache hits included.",
    ),
    ("embedgate_caller_cached_inputs", "Inputs of those calls served from the cache."),
    (
        "embedgate_caller_tokens",
        "Tokens embedded for the caller: the model's count where it told it for the "
        "call's own inputs, else the gateway's estimate (from above). Cache hits: none.",
    ),
    (
        "embedgate_caller_vendor_requests",
        "Vendor requests that carried the caller's inputs (a request shared by several "
        "callers' inputs counts for each of them).",
    ),
    (
        "embedgate_caller_cost",
        "What the caller's tokens cost at the deployments' price_per_million_tokens "
        "(models with a price only).",
    ),
)


class CallerTallies(Collector):
    """The per-caller counters, as plain sums read when scraped: every call adds to
    six of them, and a prometheus_client Counter takes a lock and checks the amount on
    each addition, which cost more than the rest of a call's bill. Added to on the
    event loop only; a scrape reads a copy."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # (caller, model) → [calls, inputs, cached, tokens, vendor requests, cost], and
        # when the series began (a Counter's _created).
        self._tallies: dict[tuple[str, str], list[float]] = {}
        self._created: dict[tuple[str, str], float] = {}
        registry.register(self)

    def tally(self, caller: str, model: str) -> list[float]:
        key = (caller, model)
        tally = self._tallies.get(key)
        if tally is None:
            self._created[key] = time.time()
            tally = self._tallies[key] = [0, 0, 0, 0, 0, 0.0]
        return tally

    def describe(self) -> Iterable[Metric]:
        for name, documentation in CALLER_COUNTERS:
            yield CounterMetricFamily(name, documentation, labels=("caller", "model"))

    def collect(self) -> Iterable[Metric]:
        tallies = [(key, list(values)) for key, values in list(self._tallies.items())]
        for column, (name, documentation) in enumerate(CALLER_COUNTERS):
            family = CounterMetricFamily(name, documentation, labels=("caller", "model"))
            for key, values in tallies:
                family.add_metric(key, values[column], created=self._created[key])
            yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.rpcs = Counter(
            "embedgate_rpcs",
            "RPCs finished, by method, model, gRPC status code and the protocol they came by "
            "(grpc; openai, rerank, connect or grpc-web for the HTTP doors).",
            ("method", "model", "code", "protocol"),
            registry=r,
        )
        self.rpc_duration = Histogram(
            "embedgate_rpc_duration_seconds",
            "Time from an RPC's start to its end, by method, model and protocol.",
            ("method", "model", "protocol"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rpcs_in_flight = Gauge(
            "embedgate_rpcs_in_flight",
            "RPCs being served now, by method (health checks not counted).",
            ("method",),
            registry=r,
        )
        self.rpcs_rejected = Counter(
            "embedgate_rpcs_rejected",
            "RPCs refused before being served, by reason (overload, unauthenticated).",
            ("reason",),
            registry=r,
        )
        self.vendor_requests = Counter(
            "embedgate_vendor_requests",
            "HTTP requests sent to vendors (each attempt), by vendor, model and HTTP status "
            "('timeout' or 'error' when no reply came).",
            ("vendor", "model", "status"),
            registry=r,
        )
        self.vendor_retries = Counter(
            "embedgate_vendor_retries",
            "Vendor attempts made again after a retryable outcome.",
            ("vendor", "model"),
            registry=r,
        )
        self.vendor_rate_limited = Counter(
            "embedgate_vendor_rate_limited",
            "Vendor replies with HTTP 429.",
            ("vendor", "model"),
            registry=r,
        )
        self.vendor_duration = Histogram(
            "embedgate_vendor_request_duration_seconds",
            "Time of one vendor attempt, from sending to the whole reply.",
            ("vendor", "model"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.vendor_in_flight = Gauge(
            "embedgate_vendor_requests_in_flight",
            "Vendor attempts under way now.",
            ("vendor", "model"),
            registry=r,
        )
        self.vendor_inputs = Histogram(
            "embedgate_vendor_request_inputs",
            "Inputs (or documents) per vendor request.",
            ("vendor", "model"),
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.local_batch_inputs = Histogram(
            "embedgate_local_batch_inputs",
            "Texts per batch the local model computes.",
            ("model",),
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.model_serving = Gauge(
            "embedgate_model_serving",
            "1 while a model is healthy, 0 while its vendor refuses the key or keeps failing.",
            ("model",),
            registry=r,
        )
        self.vendor_keys_in_service = Gauge(
            "embedgate_vendor_keys_in_service",
            "Keys of a vendor model's pool the vendor has not refused.",
            ("vendor", "model"),
            registry=r,
        )
        self.deployment_requests = Counter(
            "embedgate_deployment_requests",
            "Vendor requests of models served by several deployments, by deployment and "
            "outcome ('ok', or the reason it failed).",
            ("model", "deployment", "outcome"),
            registry=r,
        )
        self.deployment_breaker_state = Gauge(
            "embedgate_deployment_breaker_state",
            "Each deployment's breaker: 0 closed, 1 half-open (one probe), 2 open.",
            ("model", "deployment"),
            registry=r,
        )
        self.deployment_breaker_transitions = Counter(
            "embedgate_deployment_breaker_transitions",
            "Changes of a deployment's breaker, by the state it entered.",
            ("model", "deployment", "state"),
            registry=r,
        )
        self.quota_waits = Counter(
            "embedgate_quota_waits",
            "Vendor requests that waited for room in a deployment's quota, by the limit "
            "that was spent (requests, tokens, key_requests, key_tokens).",
            ("model", "deployment", "limit"),
            registry=r,
        )
        self.quota_refusals = Counter(
            "embedgate_quota_refusals",
            "Vendor requests a deployment's quota turned away at once (to another "
            "deployment, or to the caller as QUOTA_EXHAUSTED), by the limit that was spent.",
            ("model", "deployment", "limit"),
            registry=r,
        )
        self.quota_local = Gauge(
            "embedgate_quota_local",
            "1 while this replica counts the vendor quotas on its own, at quotas.local_share "
            "of each limit, because their Redis cannot be reached.",
            registry=r,
        )
        self.callers = CallerTallies(registry=r)
        self.caller_quota_refusals = Counter(
            "embedgate_caller_quota_refusals",
            "Calls refused because their caller had spent a limit (rate_limit, "
            "input_limit, token_limit).",
            ("caller", "limit"),
            registry=r,
        )
        self.deployment_tokens = Counter(
            "embedgate_deployment_tokens",
            "Tokens sent to each deployment (a model's one endpoint is its own deployment): "
            "the vendor's count, else the gateway's estimate.",
            ("model", "deployment"),
            registry=r,
        )
        self._models: frozenset[str] = frozenset()
        self._rpc_children: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}

    def serve_models(self, names: Iterable[str]) -> None:
        """The configured models: the only values the ``model`` label takes."""
        self._models = frozenset(names)

    def model_label(self, model: str) -> str:
        """``model`` as a label value: a configured name, else "(unknown)"."""
        return model if model in self._models else (UNKNOWN_MODEL if model else "")

    def rpc_finished(
        self, method: str, model: str, code: str, seconds: float, protocol: str = "grpc"
    ) -> None:
        # A name a caller made up is not a label value: labels are never unbounded.
        if model not in self._models:
            model = UNKNOWN_MODEL if model else ""
        # Children are looked up once per label set: labels() costs a few µs per call.
        key = (method, model, code, protocol)
        children = self._rpc_children.get(key)
        if children is None:
            children = self._rpc_children[key] = (
                self.rpcs.labels(method, model, code, protocol),
                self.rpc_duration.labels(method, model, protocol),
            )
        children[0].inc()
        children[1].observe(seconds)

    def caller_used(
        self,
        caller: str,
        model: str,
        *,
        inputs: int,
        cached: int,
        tokens: int,
        model_requests: int,
        cost: float | None,
        vendor: bool = True,
    ) -> None:
        """One call's use, counted for its caller (``caller``: its label value)."""
        tally = self.callers.tally(caller, model)
        tally[0] += 1
        tally[1] += inputs
        tally[2] += cached
        tally[3] += tokens
        if vendor:
            tally[4] += model_requests
        if cost is not None:
            tally[5] += cost

    def vendor(self, vendor: str, model: str) -> VendorMeter:
        return VendorMeter(self, vendor, model)

    def model_health_changed(self, model: str, serving: bool) -> None:
        """A ``health.Health`` listener: the ``embedgate_model_serving`` gauge."""
        self.model_serving.labels(model).set(1 if serving else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class VendorMeter:
    """One vendor model's instruments."""

    __slots__ = (
        "_by_status",
        "_labels",
        "_requests",
        "duration",
        "in_flight",
        "inputs",
        "keys_in_service",
        "rate_limited",
        "retries",
    )

    def __init__(self, metrics: Metrics, vendor: str, model: str) -> None:
        self._requests = metrics.vendor_requests
        self._labels = (vendor, model)
        # The counter of each HTTP status the vendor answered with, resolved once.
        self._by_status: dict[str, Counter] = {}
        self.duration = metrics.vendor_duration.labels(vendor, model)
        self.in_flight = metrics.vendor_in_flight.labels(vendor, model)
        self.inputs = metrics.vendor_inputs.labels(vendor, model)
        self.retries = metrics.vendor_retries.labels(vendor, model)
        self.rate_limited = metrics.vendor_rate_limited.labels(vendor, model)
        self.keys_in_service = metrics.vendor_keys_in_service.labels(vendor, model)

    def attempt(self, outcome: int | str, seconds: float) -> None:
        """One attempt ended: its HTTP status (or "timeout", "error" when no reply came)
        and how long it took."""
        key = str(outcome)
        counter = self._by_status.get(key)
        if counter is None:
            counter = self._by_status[key] = self._requests.labels(*self._labels, key)
        counter.inc()
        self.duration.observe(seconds)
        if outcome == 429:
            self.rate_limited.inc()
