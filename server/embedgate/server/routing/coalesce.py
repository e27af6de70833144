"""Merging concurrent calls into shared model batches.

Calls for the same model with the same options (everything but the request id) put
their inputs in one queue. A batch leaves when it holds ``max_batch`` inputs, or when
its first input has waited ``wait_s``; but a lone call (nothing else queued or being
sent, and no crowd of callers lately, see ``_complete``) does not wait for company that
is not coming: it leaves at once, with only the calls arriving at that same moment.
While earlier requests of the model wait for room in a vendor quota, a batch keeps
filling past ``wait_s``, up to its callers' deadlines. Each input has its own future, so
each caller gets exactly its own vectors back, whatever batch they travelled in.

Callers stay independent: a caller that cancels or runs out of time drops its inputs
that have not left yet; a batch already sent keeps going for the callers still waiting
on it (its deadline is the latest of theirs) and is cancelled only when all of them are
gone. With ``wait_s`` 0, nothing waits: each call's inputs are batched among themselves.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry.trace import SpanContext

from embedgate.server import tracing
from embedgate.server.deadlines import current_deadline, deadline_at
from embedgate.server.domain import EmbedOptions, Input
from embedgate.server.errors import DeadlineExceededError, InternalError, unexpected
from embedgate.server.providers.base import EmbedBatch, Provider, Vectors
from embedgate.server.routing.vectors import shape_vectors

# How fast the memory of a crowd of callers fades: a lone caller after a burst waits for
# company that will not come for a few tenths of a second at most.
CROWD_HALF_LIFE_S = 0.1


@dataclass(frozen=True, slots=True)
class ItemVector:
    """One input's vector, and what is known of the tokens it took: its own count,
    or (when its batch held only its own call's inputs) the batch's total."""

    vector: Vectors
    tokens: int | None
    batch: int
    batch_tokens: int | None
    # The deployment that served its batch, for a model with several.
    deployment: str = ""
    # The batch's span, when tracing is on.
    span: SpanContext | None = None


@dataclass(eq=False, slots=True)
class _Waiter:
    """One caller waiting for one input."""

    future: asyncio.Future[ItemVector]
    call: int  # which call it belongs to
    index: int  # the input's position in that call
    count: int  # how many inputs that call has
    request_id: str
    deadline: float | None
    # The caller's span, when tracing is on: the batch links to it.
    span: SpanContext | None = None


@dataclass(eq=False, slots=True)
class _Item:
    """One input to send, and everyone waiting for its vector: its caller, and any
    caller that asked for the same content while it was in flight."""

    input: Input
    key: bytes | None
    waiters: list[_Waiter]
    # Set when the item leaves: the batch it travels in.
    batch: _Batch | None = None

    @property
    def launched(self) -> bool:
        return self.batch is not None

    def wanted(self) -> bool:
        return any(not waiter.future.done() for waiter in self.waiters)


@dataclass(eq=False, slots=True)
class _Batch:
    items: list[_Item]
    task: asyncio.Task[None] | None = None
    # Its inputs no longer count as being sent (its request is over).
    over: bool = False


class Coalescer:
    """The batching queue of one model."""

    def __init__(
        self,
        provider: Provider,
        *,
        wait_s: float = 0.0,
        calls: Callable[[], int] | None = None,
    ) -> None:
        """``calls``: how many calls the server is serving now (None: unknown)."""
        self._provider = provider
        self._wait_s = wait_s
        self._serving = calls
        self._pending: dict[EmbedOptions, list[_Item]] = {}
        # When each forming batch leaves: a timer, or (a plain handle) at the end of this
        # turn of the event loop.
        self._timers: dict[EmbedOptions, asyncio.Handle] = {}
        # Inputs in batches being sent; the most outstanding at once lately (see
        # ``_company``) and when that was last looked at.
        self._sending = 0
        self._crowd = 0.0
        self._crowd_at = 0.0
        self._running: set[asyncio.Task[None]] = set()
        # Items in the queue or in a batch, by content key: a caller asking for the
        # same content joins the item instead of sending it again.
        self._in_flight: dict[bytes, _Item] = {}
        self._calls = 0
        self._batches = 0

    @property
    def size(self) -> int:
        return max(1, self._provider.max_batch)

    def submit(
        self,
        inputs: Sequence[Input],
        options: EmbedOptions,
        *,
        keys: Sequence[bytes] | None = None,
        indexes: Sequence[int] | None = None,
        count: int | None = None,
    ) -> list[asyncio.Future[ItemVector]]:
        """Queue a call's inputs; one future per input, in the call's order.

        ``keys`` names each input's content: an input whose content is already in
        flight is not sent again; the caller joins it (see ``_outlasting`` for a
        caller with more time than the request it joined).
        ``indexes`` and ``count`` place the inputs in the caller's request when they
        are only some of it (the rest came from the cache)."""
        loop = asyncio.get_running_loop()
        self._calls += 1
        deadline = current_deadline()
        caller_span = tracing.current()
        total = len(inputs) if count is None else count
        batch_key = _batch_key(options)
        fresh: list[_Item] = []
        futures: list[asyncio.Future[ItemVector]] = []
        for position, item in enumerate(inputs):
            waiter = _Waiter(
                loop.create_future(),
                self._calls,
                position if indexes is None else indexes[position],
                total,
                options.request_id,
                deadline,
                caller_span,
            )
            futures.append(waiter.future)
            key = keys[position] if keys is not None else None
            joined = self._in_flight.get(key) if key is not None else None
            # Anyone still waiting keeps the item alive, so it can be joined.
            if joined is not None and joined.wanted():
                joined.waiters.append(waiter)
                if joined.launched:
                    waiter.future.add_done_callback(self._on_left(joined))
                continue
            entry = _Item(item, key, [waiter])
            if key is not None:
                self._in_flight[key] = entry
            fresh.append(entry)
        if not fresh:
            return futures
        if self._wait_s <= 0:
            self._launch_all(batch_key, fresh)
            return futures
        queue = self._pending.setdefault(batch_key, [])
        queue.extend(fresh)
        soon = self._complete(len(fresh), loop.time())
        while len(queue) >= self.size:
            self._launch(batch_key, queue[: self.size])
            del queue[: self.size]
        timer = self._timers.get(batch_key)
        if not queue:
            if timer is not None:
                timer.cancel()
                del self._timers[batch_key]
            del self._pending[batch_key]
        elif soon:
            # A lone call: it leaves once the calls arriving at this same moment (if
            # any) have joined it.
            if timer is None or isinstance(timer, asyncio.TimerHandle):
                if timer is not None:
                    timer.cancel()
                self._timers[batch_key] = loop.call_soon(self._flush, batch_key)
        elif timer is None:
            self._timers[batch_key] = loop.call_later(self._wait_s, self._flush, batch_key)
        return futures

    def _complete(self, arrived: int, now: float) -> bool:
        """Whether the ``arrived`` inputs that just came are a lone call: the server is
        serving no other call, nothing else is queued or being sent, and no crowd was
        seen lately (the most inputs outstanding at once, halving every
        ``CROWD_HALF_LIFE_S``: callers of a crowd come back as their requests return,
        so the first back waits for the rest). On a busy core most of a crowd's calls
        are being read or answered, not queued: only the server's count sees them."""
        outstanding = self._sending + sum(len(queue) for queue in self._pending.values())
        remembered: float = self._crowd * 0.5 ** ((now - self._crowd_at) / CROWD_HALF_LIFE_S)
        self._crowd = max(float(outstanding), remembered)
        self._crowd_at = now
        # A crowd fading by a fraction is the same crowd.
        return (
            outstanding == arrived
            and math.ceil(remembered) <= arrived
            and (self._serving is None or self._serving() <= 1)
        )

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for queue in self._pending.values():
            for item in queue:
                for waiter in item.waiters:
                    waiter.future.cancel()
        self._pending.clear()
        self._in_flight.clear()
        for task in list(self._running):
            task.cancel()

    def _flush(self, key: EmbedOptions) -> None:
        self._timers.pop(key, None)
        queue = self._pending.get(key)
        if queue and self._holds(queue):
            # Earlier requests are waiting for room at the vendor: this batch would only
            # wait behind them, so it goes on filling.
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._wait_s, self._flush, key)
            return
        self._launch_all(key, self._pending.pop(key, []))

    def _holds(self, queue: Sequence[_Item]) -> bool:
        """Whether a batch not yet full keeps filling for another wait: while the model
        has requests waiting for a quota or a vendor's Retry-After, and no caller in it
        would reach its deadline before the next look."""
        if len(queue) >= self.size or not self._provider.waiting:
            return False
        soon = asyncio.get_running_loop().time() + 2 * self._wait_s
        return all(
            waiter.deadline is None or waiter.deadline > soon
            for item in queue
            for waiter in item.waiters
        )

    def _launch_all(self, key: EmbedOptions, items: list[_Item]) -> None:
        for start in range(0, len(items), self.size):
            self._launch(key, items[start : start + self.size])

    def _forget(self, item: _Item) -> None:
        if item.key is not None and self._in_flight.get(item.key) is item:
            del self._in_flight[item.key]

    def _launch(self, key: EmbedOptions, items: list[_Item]) -> None:
        # Inputs whose callers have all gone are not sent.
        for item in items:
            if not item.wanted():
                self._forget(item)
        items = [item for item in items if item.wanted()]
        if not items:
            return
        deadlines = [waiter.deadline for item in items for waiter in item.waiters]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        batch = _Batch(items)
        for item in items:
            item.batch = batch
        self._batches += 1
        task = asyncio.get_running_loop().create_task(
            self._run(key, items, self._batches, latest, batch)
        )
        batch.task = task
        self._running.add(task)
        self._sending += len(items)
        task.add_done_callback(self._sent(batch))
        task.add_done_callback(lambda _: self._forget_all(items))
        for item in items:
            for waiter in item.waiters:
                waiter.future.add_done_callback(self._on_left(item))

    def _sent(self, batch: _Batch) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._over(batch)  # if it ended before it began

        return done

    def _over(self, batch: _Batch) -> None:
        """The batch's request is over: its inputs are no longer being sent. Said before
        its callers are answered, so those who call again see the model as it is."""
        if not batch.over:
            batch.over = True
            self._sending -= len(batch.items)

    def _outlasting(self, items: Sequence[_Item], deadline: float) -> list[_Item]:
        """Move the waiters whose deadline is later than ``deadline`` to new items."""
        again: list[_Item] = []
        for item in items:
            later = [
                waiter
                for waiter in item.waiters
                if not waiter.future.done()
                and (waiter.deadline is None or waiter.deadline > deadline)
            ]
            if not later:
                continue
            item.waiters = [waiter for waiter in item.waiters if waiter not in later]
            fresh = _Item(item.input, item.key, later)
            if item.key is not None:
                self._in_flight[item.key] = fresh
            again.append(fresh)
        return again

    def _forget_all(self, items: Sequence[_Item]) -> None:
        for item in items:
            self._forget(item)

    def _on_left(self, item: _Item) -> Callable[[asyncio.Future[ItemVector]], None]:
        """A callback for a waiter of a sent item: when the last caller waiting on
        anything in the batch has gone, the batch is cancelled."""

        def left(future: asyncio.Future[ItemVector]) -> None:
            if not future.cancelled() or item.wanted():
                return
            self._forget(item)
            batch = item.batch
            if batch is None or batch.task is None:
                return
            if not any(other.wanted() for other in batch.items):
                batch.task.cancel()

        return left

    def _request_id(self, items: Sequence[_Item]) -> str:
        waiters = [item.waiters[0] for item in items]
        first = waiters[0]
        whole = (
            len(items) == first.count
            and all(len(item.waiters) == 1 for item in items)
            and all(waiter.call == first.call for waiter in waiters)
        )
        return part_request_id(first.request_id, first.index, whole=whole)

    def runs_inline(self, count: int) -> bool:
        """Whether a call of ``count`` inputs that shares nothing with others (no wait
        for company, no identical inputs to join) can be sent from the caller's own
        task: one vendor request, nobody else waiting on it."""
        return self._wait_s <= 0 and count <= self.size

    async def embed_now(
        self, inputs: Sequence[Input], options: EmbedOptions, *, indexes: Sequence[int], count: int
    ) -> list[ItemVector]:
        """Send one call's inputs as one request from the caller's task (see
        ``runs_inline``): the same request, vectors and errors as through the queue,
        without a task and a future per input. ``indexes`` and ``count`` place the
        inputs in the caller's request."""
        self._batches += 1
        whole = len(inputs) == count
        request_id = part_request_id(options.request_id, indexes[0], whole=whole)
        key = _batch_key(options)
        try:
            batch, vectors = await self._send(key, inputs, request_id)
        except Exception as error:
            raise unexpected(error).with_input(indexes[0])  # noqa: B904 - the cause is kept in it
        total = batch.token_total if whole else None
        return [
            ItemVector(
                vectors[position],
                _own_tokens(batch, position, len(inputs)),
                self._batches,
                total,
                batch.deployment,
            )
            for position in range(len(inputs))
        ]

    async def _send(
        self, key: EmbedOptions, inputs: Sequence[Input], request_id: str
    ) -> tuple[EmbedBatch, Vectors]:
        """One vendor request, and its vectors cut and normalised as ``key`` asks."""
        provider = self._provider
        options = EmbedOptions(
            instruction=key.instruction,
            dimensions=key.dimensions,
            normalize=key.normalize,
            request_id=request_id,
            user=key.user,
        )
        batch = await provider.embed(inputs, options)
        if batch.vectors.shape[0] != len(inputs):
            raise InternalError(
                f"model {provider.info.name} returned {batch.vectors.shape[0]} vectors "
                f"for {len(inputs)} inputs"
            )
        normalize = (
            key.normalize if key.normalize is not None else provider.info.normalizes_by_default
        )
        vectors = shape_vectors(batch.vectors, dimensions=key.dimensions, normalize=normalize)
        return batch, vectors

    async def _run(
        self,
        key: EmbedOptions,
        items: list[_Item],
        batch_id: int,
        deadline: float | None,
        sent: _Batch,
    ) -> None:
        callers = tracing.distinct(w.span for item in items for w in item.waiters)
        try:
            try:
                # One span for the batch, in the first caller's trace and linked to every
                # caller's (the way batching systems record fan-in).
                with (
                    tracing.span(
                        "embedgate.batch",
                        {"embedgate.inputs": len(items), "embedgate.callers": len(callers)},
                        parent=callers[0] if callers else None,
                        links=callers,
                    ) as span,
                    deadline_at(deadline),
                ):
                    batch_span = span.get_span_context() if span is not None else None
                    batch, vectors = await self._send(
                        key, [item.input for item in items], self._request_id(items)
                    )
            finally:
                self._over(sent)
        except asyncio.CancelledError:
            for item in items:
                for waiter in item.waiters:
                    waiter.future.cancel()
            raise
        except Exception as error:  # every waiting caller is told, each about its own input
            failure = unexpected(error)
            if isinstance(failure, DeadlineExceededError) and deadline is not None:
                # Callers that joined after the batch left may have more time than it
                # had: their inputs go again, under their own deadlines.
                self._launch_all(key, self._outlasting(items, deadline))
            for item in items:
                for waiter in item.waiters:
                    if not waiter.future.done():
                        waiter.future.set_exception(failure.with_input(waiter.index))
            return
        calls = {waiter.call for item in items for waiter in item.waiters}
        total = batch.token_total if len(calls) == 1 else None
        for position, item in enumerate(items):
            tokens = _own_tokens(batch, position, len(items))
            for order, waiter in enumerate(item.waiters):
                if waiter.future.done():
                    continue
                # The vendor counted the input once: callers that joined it cost nothing.
                own = tokens if order == 0 else (0 if tokens is not None else None)
                waiter.future.set_result(
                    ItemVector(
                        vectors[position], own, batch_id, total, batch.deployment, batch_span
                    )
                )


def _batch_key(options: EmbedOptions) -> EmbedOptions:
    """The options that decide a vendor request: what the caller gets back from it
    (its id, its output encoding, its cache use) does not."""
    return EmbedOptions(
        instruction=options.instruction,
        dimensions=options.dimensions,
        normalize=options.normalize,
        user=options.user,
    )


def _own_tokens(batch: EmbedBatch, position: int, count: int) -> int | None:
    """The tokens of the input at ``position`` of a request of ``count`` inputs: its
    own count where the model gives one, or the request's total when it was alone."""
    tokens = batch.tokens[position] if batch.tokens is not None else None
    if tokens is None and count == 1:
        tokens = batch.token_total
    return tokens


def part_request_id(request_id: str, start: int, *, whole: bool) -> str:
    """The request id of one vendor request: the caller's when the request carries the
    whole call, else suffixed with the position of its first input, so a vendor that
    treats ids as unique never sees one twice."""
    if whole or not request_id:
        return request_id
    return f"{request_id}-{start}"
