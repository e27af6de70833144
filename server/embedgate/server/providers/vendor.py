"""A model served by a vendor's HTTP API: a dialect (pure translation) sent through a
``Sender`` (the shared HTTP driver) with retries, and the vendor's failures turned into
the gateway's errors by one table."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import structlog
from opentelemetry.trace import SpanKind

from embedgate.server import tracing
from embedgate.server.deadlines import current_deadline
from embedgate.server.domain import (
    EmbedOptions,
    Input,
    ModelInfo,
    estimate_tokens,
)
from embedgate.server.errors import (
    Problem,
    QuotaExhaustedError,
    QuotaViolation,
    Reason,
    VendorAuthError,
    VendorBadReplyError,
    VendorError,
    VendorFailedError,
    VendorNotFoundError,
    VendorRateLimitedError,
    VendorRejectedError,
    VendorUnavailableError,
)
from embedgate.server.health import Health, ModelHealth
from embedgate.server.metrics import Metrics
from embedgate.server.providers.base import EmbedBatch, Ranking
from embedgate.server.providers.dialect import (
    BadReply,
    Dialect,
    Embeddings,
    ErrorInReply,
    Reranking,
    VendorFault,
    WireOptions,
    decode_json,
    dumps,
)
from embedgate.server.providers.http import (
    HttpReply,
    RetryPolicy,
    Sender,
    TransportFailure,
    post,
    retryable_status,
)
from embedgate.server.providers.keys import KeyPool
from embedgate.server.quotas import Admission, Quota, Refusal

# What a vendor request's reply is parsed into (vectors, or a ranking).
_Parsed = TypeVar("_Parsed")

log = structlog.get_logger("embedgate.vendor")

USER_AGENT = "embedgate/0.1"
# Vendor messages are quoted to callers and logs, cut to a readable length.
MAX_QUOTED_CHARS = 300


@dataclass(frozen=True, slots=True)
class VendorQuota:
    """How a vendor model takes from its vendor quotas: ``quota`` (None: it has none),
    ``model`` (the model a deployment belongs to; empty: the model itself) and whether it
    ``waits`` for room within the caller's deadline (a deployment does not: its model
    sends the request elsewhere, or waits itself)."""

    quota: Quota | None = None
    model: str = ""
    waits: bool = True


class _KeyFull(Exception):  # noqa: N818 - a signal inside the key loop, never raised out
    """A key's own quota has no room: the pool's other keys may have."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__()
        self.refusal = refusal


class VendorProvider:
    """Implements the provider seam for every vendor dialect: the model's settings are
    the dialect's; ``keys`` were read at start-up (none, one, or a pool used in turn)
    and ``base_url`` resolved."""

    def __init__(
        self,
        dialect: Dialect,
        sender: Sender,
        metrics: Metrics | None = None,
        *,
        base_url: str,
        keys: Sequence[str] = (),
        health: ModelHealth | None = None,
        quota: VendorQuota | None = None,
    ) -> None:
        settings = dialect.settings
        self._settings = settings
        self._dialect = dialect
        self._sender = sender
        self._base_url = base_url
        # Never logged, never repr'd, never put in an error.
        self._keys = KeyPool(keys)
        self._retry = RetryPolicy(
            max_retries=settings.max_retries,
            backoff_initial_s=settings.retry_backoff_s,
            backoff_max_s=settings.retry_backoff_max_s,
            attempt_timeout_s=settings.timeout_s,
        )
        metrics = metrics or Metrics()
        self._meter = metrics.vendor(dialect.vendor, settings.name)
        self._meter.keys_in_service.set(len(self._keys))
        self._quota_metrics = {"waited": metrics.quota_waits, "refused": metrics.quota_refusals}
        self._health = health or Health().model(settings.name)
        self._limit = asyncio.Semaphore(settings.max_concurrency)
        self._quota = quota or VendorQuota()
        self._model_name = self._quota.model or settings.name
        # Tokens sent to this deployment (a model's one endpoint is its own).
        self._tokens_sent = metrics.deployment_tokens.labels(self._model_name, settings.name)
        # Requests held back now, waiting for room in a quota or for a key.
        self._waiting = 0
        # Requests waiting for room in the quota, in arrival order; the last refusal
        # seen in line and when it said there would be room (event loop time).
        self._line = asyncio.Lock()
        self._last_refusal: Refusal | None = None
        self._room_at = 0.0
        caps = dialect.capabilities
        self._info = ModelInfo(
            name=settings.name,
            provider=dialect.vendor,
            modalities=caps.modalities,
            max_inputs_per_call=settings.max_inputs,
            max_text_chars=settings.max_text_chars,
            dimensions=caps.dimensions,
            embeds=caps.embeds,
            # Embedding models rerank by cosine similarity; rerank models natively.
            reranks=True,
            native_rerank=caps.reranks,
            accepts_instruction=caps.accepts_instruction,
            normalizes_by_default=settings.normalize,
            source=f"{dialect.vendor} {base_url} {settings.vendor_model}",
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch(self) -> int:
        return self._dialect.capabilities.max_batch

    @property
    def waiting(self) -> int:
        return self._waiting

    async def start(self) -> None:
        await self._sender.start()

    async def close(self) -> None:
        await self._sender.close()

    async def check(self, inputs: Sequence[Input], options: EmbedOptions) -> list[Problem]:
        return self._dialect.check(inputs, options)

    def sizes(self, asked: int | None) -> tuple[int | None, int]:
        """The size to ask the vendor for (None: send none) and the size its vectors
        will have. A Matryoshka model asked for a size the vendor doesn't give gets the
        next larger one, cut by the routing layer."""
        caps = self._dialect.capabilities
        native = caps.native
        wanted = native.default if asked is None else asked
        if not native.accepts(wanted):
            wanted = min(
                (size for size in native.allowed if size >= wanted), default=native.maximum
            )
        return (wanted if caps.sends_dimensions else None), wanted

    async def embed(self, inputs: Sequence[Input], options: EmbedOptions) -> EmbedBatch:
        send, expect = self.sizes(options.dimensions)
        normalize = options.normalize if options.normalize is not None else self._settings.normalize
        wire = WireOptions(
            dimensions=send,
            instruction=options.instruction,
            request_id=options.request_id,
            user=options.user,
            normalize=normalize,
        )
        body = self._dialect.embed_body(inputs, wire)

        def parse(payload: Any) -> tuple[Embeddings, int | None]:
            parsed = self._dialect.parse_embeddings(payload, len(inputs), expect)
            return parsed, parsed.prompt_tokens

        parsed, tokens = await self._exchange(
            "embeddings", self._dialect.embed_path, body, options.request_id, inputs, parse
        )
        return EmbedBatch(
            vectors=parsed.vectors,
            tokens=(tokens,) if tokens is not None and len(inputs) == 1 else None,
            total_tokens=tokens,
        )

    @contextmanager
    def _traced(self, operation: str, inputs: int) -> Iterator[Any]:
        """The span of one vendor request (GenAI conventions), around its attempts,
        whose own spans repeat what names the request."""
        settings = self._settings
        named = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": settings.vendor_model,
            "embedgate.deployment": settings.name,
        }
        with (
            tracing.span(
                f"{operation} {settings.vendor_model}",
                {
                    **named,
                    "gen_ai.provider.name": self._dialect.vendor,
                    "embedgate.model": self._model_name,
                    "embedgate.inputs": inputs,
                },
                kind=SpanKind.CLIENT,
            ) as span,
            tracing.passing_down(named),
        ):
            yield span

    async def _exchange(
        self,
        operation: str,
        path: str,
        body: Mapping[str, Any],
        request_id: str,
        sent: Sequence[Input | str],
        parse: Callable[[Any], tuple[_Parsed, int | None]],
        items: int | None = None,
    ) -> tuple[_Parsed, int | None]:
        """One vendor request from admission to answer, in its span: ``sent`` are what it
        carries (``items`` of them counted as its inputs, all by default), ``parse``
        reads the reply and its tokens. A reply that does not parse fails the model; an
        answer leaves it healthy, its tokens counted as sent (the vendor's count, else
        the estimate) and its quota's estimate settled."""
        admission = self._admission(sent)
        with self._traced(operation, len(sent)) as span:
            payload = await self._call(
                path, body, request_id, len(sent) if items is None else items, admission
            )
            try:
                parsed, tokens = parse(payload)
            except (BadReply, ErrorInReply) as problem:
                self._reply_failed(problem, payload)
            if span is not None and tokens is not None:
                span.set_attribute("gen_ai.usage.input_tokens", tokens)
        self._health.succeeded()
        self._tokens_sent.inc(tokens if tokens is not None else estimate_tokens(sent))
        if admission is not None:
            await admission.settle(tokens)
        return parsed, tokens

    # -- quotas -------------------------------------------------------------------

    def _admission(self, inputs: Sequence[Input | str]) -> Admission | None:
        quota = self._quota.quota
        return quota.admission(estimate_tokens(inputs)) if quota is not None else None

    async def _admit(self, admission: Admission, key: int | None) -> None:
        """Take one attempt's share of the quotas (``key``: the key it goes with),
        waiting for room when that is within the deadline and this model waits; else
        ``QuotaExhaustedError``, or ``_KeyFull`` when only the key of a pool is full."""
        deadline = current_deadline()
        if not (self._quota.waits and self._line.locked()):
            refusal = await admission.take(key)
            if refusal is None:
                return
            self._may_wait(refusal, deadline)
        await self._wait_in_line(admission, key, deadline)

    def _may_wait(self, refusal: Refusal, deadline: float | None) -> None:
        """Raise unless the request may wait out ``refusal``."""
        if refusal.by_key and len(self._keys) > 1:
            self._count_quota(refusal, "refused")
            raise _KeyFull(refusal)
        now = asyncio.get_running_loop().time()
        if not self._quota.waits or (deadline is not None and now + refusal.wait_s >= deadline):
            self._count_quota(refusal, "refused")
            raise self._exhausted(refusal)
        self._count_quota(refusal, "waited")
        self._last_refusal = refusal
        self._room_at = now + refusal.wait_s

    async def _wait_in_line(
        self, admission: Admission, key: int | None, deadline: float | None
    ) -> None:
        """Wait for room in arrival order: only the first request in line asks the quota
        again, so no request is passed over time after time by later ones."""
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            try:
                # Out of time in line: the quota's answer, a moment before the deadline's.
                async with asyncio.timeout_at(None if deadline is None else deadline - 0.02):
                    await self._line.acquire()
            except TimeoutError:
                last = self._last_refusal or Refusal(0.0, ())
                wait = max(0.0, self._room_at - loop.time())
                raise self._exhausted(Refusal(wait, last.limits)) from None
            try:
                while True:
                    # Until the room the last refusal promised, then ask again.
                    delay = self._room_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    refusal = await admission.take(key)
                    if refusal is None:
                        return
                    self._may_wait(refusal, deadline)
            finally:
                self._line.release()
        finally:
            self._waiting -= 1

    def _count_quota(self, refusal: Refusal, outcome: str) -> None:
        counter = self._quota_metrics[outcome]
        for limit in refusal.limits:
            counter.labels(self._model_name, self._settings.name, limit.kind).inc()

    def _exhausted(self, refusal: Refusal) -> QuotaExhaustedError:
        name = self._settings.name
        where = (
            f"deployment {name!r} of model {self._model_name}"
            if self._quota.model
            else f"model {name}"
        )
        spent = ", ".join(limit.what for limit in refusal.limits)
        return QuotaExhaustedError(
            f"the vendor quota of {where} has no room now ({spent}); room again in "
            f"{refusal.wait_s:.2f} s",
            retry_after_s=refusal.wait_s,
            metadata={"model": self._model_name, "deployment": name},
            violations=[
                QuotaViolation(
                    f"deployment:{name}"
                    + (f"/key:{limit.key_index}" if limit.key_index is not None else ""),
                    limit.what,
                )
                for limit in refusal.limits
            ],
        )

    def _admitter(
        self, admission: Admission | None, key: int | None
    ) -> Callable[[], Awaitable[None]] | None:
        return None if admission is None else functools.partial(self._admit, admission, key)

    # -- the call and its failures ---------------------------------------------

    def _headers(self, request_id: str, key: str | None) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "user-agent": USER_AGENT,
        }
        headers.update(self._dialect.extra_headers)
        if request_id:
            headers["x-request-id"] = request_id
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def _send(
        self, url: str, body: bytes, request_id: str, admission: Admission | None
    ) -> HttpReply:
        """The request's final reply. With a pool of keys, a key the vendor refuses
        leaves the pool and one it tells to wait sits out, the request going on with
        another key; when every key waits, the request waits for the first (within the
        deadline), and when every key is refused, the last refusal is the answer."""
        pool = self._keys
        if len(pool) <= 1:
            key = pool.key(0) if len(pool) else None
            headers = self._headers(request_id, key)
            admit = self._admitter(admission, 0 if key is not None else None)
            return await self._post(url, body, headers, retryable_status, admit)
        loop = asyncio.get_running_loop()
        deadline = current_deadline()
        turns = len(pool) * (self._retry.max_retries + 1)
        reply: HttpReply | None = None
        full: Refusal | None = None  # the last key whose own quota had no room
        for _ in range(turns):
            index = pool.pick()
            if index is None:
                wait = pool.ready_in()
                if wait is None or (deadline is not None and loop.time() + wait >= deadline):
                    break  # every key refused, or waiting past the deadline
                self._waiting += 1
                try:
                    await asyncio.sleep(wait)
                finally:
                    self._waiting -= 1
                index = pool.pick()
                if index is None:
                    continue
            headers = self._headers(request_id, pool.key(index))
            try:
                reply = await self._post(
                    url, body, headers, _retryable_with_a_pool, self._admitter(admission, index)
                )
            except _KeyFull as over:
                full = over.refusal
                pool.wait(index, full.wait_s)
                continue
            if reply.status in (401, 403):
                pool.refuse(index)
                self._meter.keys_in_service.set(pool.in_service)
                log.warning(
                    "vendor_key_refused",
                    model=self._settings.name,
                    key=index,
                    keys_in_service=pool.in_service,
                )
            elif reply.status == 429:
                wait = reply.retry_after_s
                pool.wait(index, wait if wait is not None else self._retry.backoff_initial_s)
            else:
                return reply
        if reply is not None:
            return reply
        wait, name = pool.ready_in(), self._settings.name
        if full is not None and wait is not None:
            raise self._exhausted(Refusal(wait, full.limits))
        metadata = {"vendor": self._dialect.vendor, "keys": str(len(pool))}
        if wait is None:
            self._health.out_of_service()
            raise VendorAuthError(
                f"{self._dialect.title} refused every key of model {name}; the gateway's "
                "operator must fix its keys",
                metadata=metadata,
            )
        raise VendorRateLimitedError(
            f"every key of model {name} is waiting out a 429", retry_after_s=wait, metadata=metadata
        )

    async def _post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        retryable: Callable[[int], bool],
        admit: Callable[[], Awaitable[None]] | None,
    ) -> HttpReply:
        return await post(
            self._sender,
            url,
            body,
            headers,
            policy=self._retry,
            limit=self._limit,
            vendor=self._dialect.title,
            meter=self._meter,
            retryable=retryable,
            admit=admit,
        )

    async def _call(
        self,
        path: str,
        body: Mapping[str, Any],
        request_id: str,
        items: int,
        admission: Admission | None,
    ) -> Any:
        url = self._base_url.rstrip("/") + path
        started = time.perf_counter()
        title = self._dialect.title
        meter = self._meter
        meter.inputs.observe(items)
        try:
            reply = await self._send(url, dumps(body), request_id, admission)
        except VendorBadReplyError:
            self._health.failed()
            raise
        except TransportFailure as failure:
            self._health.failed()
            log.warning(
                "vendor_call_failed",
                vendor=self._dialect.vendor,
                model=self._settings.name,
                attempts=failure.attempts,
                error=failure.description,
            )
            raise VendorUnavailableError(
                f"could not reach {title} for model {self._settings.name} after "
                f"{failure.attempts} attempt(s): {failure.description}",
                metadata={"vendor": self._dialect.vendor, "attempts": str(failure.attempts)},
            ) from None
        if log.is_enabled_for(logging.DEBUG):  # the fields cost more than the dropped line
            log.debug(
                "vendor_call",
                vendor=self._dialect.vendor,
                model=self._settings.name,
                http_status=reply.status,
                attempts=reply.attempts,
                inputs=items,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        if reply.status != 200:
            self._http_failed(reply)
        try:
            return decode_json(reply.content)
        except BadReply as problem:
            self._reply_failed(problem, None)

    def _quote(self, text: str | None) -> str | None:
        """A vendor's words, shortened, with the key taken out should it echo it."""
        if not text:
            return None
        for key in self._keys.keys:
            text = text.replace(key, "[redacted]")
        if len(text) > MAX_QUOTED_CHARS:
            text = text[:MAX_QUOTED_CHARS] + "…"
        return text

    def _metadata(self, fault: VendorFault, status: int) -> dict[str, str]:
        details = {
            "vendor": self._dialect.vendor,
            "http_status": str(status),
            "vendor_code": self._quote(fault.code),
            "vendor_message": self._quote(fault.message),
            "vendor_type": self._quote(fault.type),
            "vendor_request_id": self._quote(fault.request_id),
        }
        return {key: value for key, value in details.items() if value}

    def _http_failed(self, reply: HttpReply) -> NoReturn:
        try:
            fault = self._dialect.parse_error(decode_json(reply.content))
        except BadReply:
            fault = VendorFault()
        status = reply.status
        metadata = self._metadata(fault, status)
        if reply.attempts > 1:
            metadata["attempts"] = str(reply.attempts)
        log.warning("vendor_call_failed", model=self._settings.name, **metadata)
        error = vendor_error(
            f"{self._dialect.title} (model {self._settings.name}) answered HTTP {status}",
            status,
            metadata,
            retry_after_s=reply.retry_after_s if status == 429 else None,
        )
        if isinstance(error, VendorAuthError):
            self._health.out_of_service()
        elif isinstance(error, VendorUnavailableError):
            self._health.failed()
        raise error

    def _reply_failed(self, problem: BadReply | ErrorInReply, payload: Any) -> NoReturn:
        self._health.failed()
        title = self._dialect.title
        if isinstance(problem, ErrorInReply):
            metadata = self._metadata(problem.fault, 200)
            said = metadata.get("vendor_message", "no message")
            log.warning("vendor_call_failed", model=self._settings.name, **metadata)
            raise VendorFailedError(
                f"{title} (model {self._settings.name}) reported an error in a 200 reply: {said}",
                reason=Reason.VENDOR_ERROR_IN_REPLY,
                metadata=metadata,
            )
        metadata = {"vendor": self._dialect.vendor, "http_status": "200"}
        log.warning(
            "vendor_bad_reply",
            vendor=self._dialect.vendor,
            model=self._settings.name,
            problem=str(problem),
        )
        raise VendorBadReplyError(
            f"{title} (model {self._settings.name}) sent an unusable reply: {problem}",
            metadata=metadata,
        )


class RerankingVendorProvider(VendorProvider):
    """A vendor model that ranks documents itself, through its dialect's rerank
    endpoint (the dialect has the ``Reranking`` capability)."""

    def __init__(
        self,
        dialect: Reranking,
        sender: Sender,
        metrics: Metrics | None = None,
        *,
        base_url: str,
        keys: Sequence[str] = (),
        health: ModelHealth | None = None,
        quota: VendorQuota | None = None,
    ) -> None:
        if not isinstance(dialect, Dialect):
            raise TypeError(f"{type(dialect).__name__} is not a vendor dialect")
        super().__init__(
            dialect, sender, metrics, base_url=base_url, keys=keys, health=health, quota=quota
        )
        self._reranker = dialect

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None, options: EmbedOptions
    ) -> Ranking:
        body = self._reranker.rerank_body(query, documents, top_n)

        def parse(payload: Any) -> tuple[Ranking, int | None]:
            ranking = self._reranker.parse_ranking(payload, len(documents), top_n)
            return ranking, ranking.total_tokens

        ranking, _ = await self._exchange(
            "rerank",
            self._reranker.rerank_path,
            body,
            options.request_id,
            [query, *documents],
            parse,
            items=len(documents),
        )
        return ranking


# What each HTTP status says went wrong, and how a message puts it after "answered
# HTTP <status>". Any other 5xx is the vendor being unavailable; any other status, a
# failure the gateway has no better name for.
_BY_STATUS: dict[int, tuple[type[VendorError], str]] = {
    400: (VendorRejectedError, ", rejecting the request"),
    413: (VendorRejectedError, ", rejecting the request"),
    422: (VendorRejectedError, ", rejecting the request"),
    401: (
        VendorAuthError,
        ": the gateway's credentials for this vendor were refused; "
        "the gateway's operator must fix its key",
    ),
    403: (
        VendorAuthError,
        ": the gateway's credentials for this vendor were refused; "
        "the gateway's operator must fix its key",
    ),
    404: (VendorNotFoundError, ": not found"),
    408: (VendorUnavailableError, ""),
    429: (VendorRateLimitedError, ": rate limited"),
}


def vendor_error(
    where: str,
    status: int,
    metadata: dict[str, str],
    *,
    retry_after_s: float | None = None,
) -> VendorError:
    """The error a vendor's HTTP ``status`` reply is (``where`` says who answered;
    ``metadata`` holds what the vendor said, quoted in the message)."""
    kind, phrase = _BY_STATUS.get(
        status, (VendorUnavailableError if status >= 500 else VendorFailedError, "")
    )
    said = f": {metadata['vendor_message']}" if "vendor_message" in metadata else ""
    message = f"{where}{phrase}{said}"
    if kind is VendorRateLimitedError:
        if retry_after_s is not None:
            metadata = {**metadata, "retry_after_s": f"{retry_after_s:g}"}
        return VendorRateLimitedError(message, retry_after_s=retry_after_s, metadata=metadata)
    return kind(message, metadata=metadata)


def _retryable_with_a_pool(status: int) -> bool:
    """With a pool of keys a 429 goes to another key at once, not to the same one later."""
    return status != 429 and retryable_status(status)
