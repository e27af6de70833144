"""The flow control of a bidirectional stream of requests (``EmbedPipeline``).

Requests are served concurrently, and at most ``window`` of them are between being read
and their reply being taken by the caller: the next request is read only when a reply
has left, so HTTP/2's flow control slows down a caller that sends faster than it reads.
Replies leave in the order they are ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from embedgate.server.errors import EmbedgateError

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class Window(Generic[Request, Reply]):
    """Serves a stream of requests with at most ``size`` in flight. ``replies()`` yields
    every reply (close it when done: closing stops the reading and the serving); then
    ``ended`` holds what ended the reading early (bytes that do not parse), if anything:
    the requests before it are still answered."""

    def __init__(
        self,
        requests: AsyncIterator[Request],
        serve: Callable[[Request], Awaitable[Reply]],
        size: int,
    ) -> None:
        self._requests = requests
        self._serve = serve
        self._slots = asyncio.Semaphore(size)
        self._replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        self._workers: set[asyncio.Task[None]] = set()
        self.ended: EmbedgateError | None = None

    async def replies(self) -> AsyncGenerator[Reply, None]:
        reader = asyncio.create_task(self._read())
        try:
            while (reply := await self._replies.get()) is not None:
                yield reply
                self._slots.release()
            await reader  # a failure to read the stream surfaces here
        finally:
            reader.cancel()
            for worker in list(self._workers):
                worker.cancel()

    async def _read(self) -> None:
        """Read and serve every request, then mark the end of the replies."""
        try:
            while True:
                await self._slots.acquire()
                try:
                    request = await anext(self._requests)
                except StopAsyncIteration:
                    break
                except EmbedgateError as error:
                    self.ended = error
                    break
                worker = asyncio.create_task(self._answer(request))
                self._workers.add(worker)
                worker.add_done_callback(self._workers.discard)
            while self._workers:
                await asyncio.wait(set(self._workers))
        finally:
            await self._replies.put(None)

    async def _answer(self, request: Request) -> None:
        await self._replies.put(await self._serve(request))
