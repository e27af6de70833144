"""Merging concurrent calls into shared model batches.

Calls for the same model with the same options (everything but the request id) put
their inputs in one queue; a batch leaves when it holds ``max_batch`` inputs or when
the first input has waited ``wait_s``. Each input has its own future, so each caller
gets exactly its own vectors back, whatever batch they travelled in.

Callers stay independent: a caller that cancels or runs out of time drops its inputs
that have not left yet; a batch already sent keeps going for the callers still waiting
on it (its deadline is the latest of theirs) and is cancelled only when all of them are
gone. With ``wait_s`` 0, nothing waits: each call's inputs are batched among themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from embedgate.server.deadlines import current_deadline, deadline_at
from embedgate.server.domain import EmbedOptions, Input
from embedgate.server.errors import EmbedgateError, InternalError
from embedgate.server.providers.base import Provider, Vectors
from embedgate.server.routing.vectors import shape_vectors


@dataclass(frozen=True, slots=True)
class ItemVector:
    """One input's vector, and what is known of the tokens it took: its own count,
    or (when its batch held only its own call's inputs) the batch's total."""

    vector: Vectors
    tokens: int | None
    batch: int
    batch_tokens: int | None


@dataclass(eq=False, slots=True)
class _Item:
    input: Input
    future: asyncio.Future[ItemVector]
    call: int  # which call it belongs to
    index: int  # its position in that call
    count: int  # how many inputs that call has
    request_id: str
    deadline: float | None


class Coalescer:
    """The batching queue of one model."""

    def __init__(self, provider: Provider, *, wait_s: float = 0.0) -> None:
        self._provider = provider
        self._wait_s = wait_s
        self._pending: dict[EmbedOptions, list[_Item]] = {}
        self._timers: dict[EmbedOptions, asyncio.TimerHandle] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._calls = 0
        self._batches = 0

    @property
    def size(self) -> int:
        return max(1, self._provider.max_batch)

    def submit(
        self, inputs: Sequence[Input], options: EmbedOptions
    ) -> list[asyncio.Future[ItemVector]]:
        """Queue a call's inputs; one future per input, in the call's order."""
        loop = asyncio.get_running_loop()
        self._calls += 1
        deadline = current_deadline()
        items = [
            _Item(
                item,
                loop.create_future(),
                self._calls,
                index,
                len(inputs),
                options.request_id,
                deadline,
            )
            for index, item in enumerate(inputs)
        ]
        key = dataclasses.replace(options, request_id="")
        if self._wait_s <= 0:
            self._launch_all(key, items)
        else:
            queue = self._pending.setdefault(key, [])
            queue.extend(items)
            while len(queue) >= self.size:
                self._launch(key, queue[: self.size])
                del queue[: self.size]
            timer = self._timers.get(key)
            if queue and timer is None:
                self._timers[key] = loop.call_later(self._wait_s, self._flush, key)
            elif not queue:
                if timer is not None:
                    timer.cancel()
                    del self._timers[key]
                del self._pending[key]
        return [item.future for item in items]

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for queue in self._pending.values():
            for item in queue:
                item.future.cancel()
        self._pending.clear()
        for task in list(self._running):
            task.cancel()

    def _flush(self, key: EmbedOptions) -> None:
        self._timers.pop(key, None)
        self._launch_all(key, self._pending.pop(key, []))

    def _launch_all(self, key: EmbedOptions, items: list[_Item]) -> None:
        for start in range(0, len(items), self.size):
            self._launch(key, items[start : start + self.size])

    def _launch(self, key: EmbedOptions, items: list[_Item]) -> None:
        # Inputs whose caller has gone are not sent.
        items = [item for item in items if not item.future.done()]
        if not items:
            return
        self._batches += 1
        task = asyncio.get_running_loop().create_task(self._run(key, items, self._batches))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        waiting = len(items)

        def left(future: asyncio.Future[ItemVector]) -> None:
            nonlocal waiting
            if future.cancelled():
                waiting -= 1
                if waiting == 0:  # nobody wants this batch any more
                    task.cancel()

        for item in items:
            item.future.add_done_callback(left)

    def _request_id(self, items: Sequence[_Item]) -> str:
        first = items[0]
        whole = len(items) == first.count and all(item.call == first.call for item in items)
        return part_request_id(first.request_id, first.index, whole=whole)

    async def _run(self, key: EmbedOptions, items: list[_Item], batch_id: int) -> None:
        provider = self._provider
        deadlines = [item.deadline for item in items]
        latest = (
            None
            if any(d is None for d in deadlines)
            else max(d for d in deadlines if d is not None)
        )
        options = dataclasses.replace(key, request_id=self._request_id(items))
        try:
            with deadline_at(latest):
                batch = await provider.embed([item.input for item in items], options)
            if batch.vectors.shape[0] != len(items):
                raise InternalError(
                    f"model {provider.info.name} returned {batch.vectors.shape[0]} vectors "
                    f"for {len(items)} inputs"
                )
            normalize = (
                key.normalize if key.normalize is not None else provider.info.normalizes_by_default
            )
            vectors = shape_vectors(batch.vectors, dimensions=key.dimensions, normalize=normalize)
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise
        except Exception as error:  # every waiting caller is told, each about its own input
            failure = error if isinstance(error, EmbedgateError) else _unexpected(error)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(_for_input(failure, item.index))
            return
        single_call = all(item.call == items[0].call for item in items)
        total = batch.token_total if single_call else None
        for position, item in enumerate(items):
            if item.future.done():
                continue
            tokens = batch.tokens[position] if batch.tokens is not None else None
            if tokens is None and len(items) == 1:
                tokens = batch.token_total
            item.future.set_result(ItemVector(vectors[position], tokens, batch_id, total))


def part_request_id(request_id: str, start: int, *, whole: bool) -> str:
    """The request id of one vendor request: the caller's when the request carries the
    whole call, else suffixed with the position of its first input, so a vendor that
    treats ids as unique never sees one twice."""
    if whole or not request_id:
        return request_id
    return f"{request_id}-{start}"


def _for_input(error: EmbedgateError, index: int) -> EmbedgateError:
    """A copy of a batch's error that names one caller's input (callers share the
    batch, not the error object)."""
    # Not copy.copy: that rebuilds the exception from its args, which the error
    # classes' constructors do not all take back.
    own = type(error).__new__(type(error), *error.args)
    own.__dict__.update(error.__dict__)
    own.metadata = {key: value for key, value in error.metadata.items() if key != "input_index"}
    own.input_index = None
    return own.for_input(index)


def _unexpected(error: BaseException) -> EmbedgateError:
    return InternalError(f"unexpected failure: {type(error).__name__}")
