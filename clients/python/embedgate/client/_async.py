"""The asyncio client (``grpc.aio``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType

import grpc

from embedgate.client._errors import error_from_aio
from embedgate.client._inputs import InputLike
from embedgate.client._types import (
    CHANNEL_OPTIONS,
    EmbedResult,
    ModelInfo,
    RerankResult,
    StreamItem,
    embed_request,
    embed_result,
    model_infos,
    rerank_request,
    rerank_result,
    stream_item,
)
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

Metadata = Sequence[tuple[str, str]]


class AsyncClient:
    """An asyncio embedgate client over one ``grpc.aio`` channel.

    ``timeout`` (seconds) is the deadline of each call unless a call gives its own;
    ``None`` means no deadline. Failures raise :class:`EmbedgateError` subclasses.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 60.0,
        metadata: Metadata = (),
    ) -> None:
        self._own_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def embed(
        self,
        inputs: Iterable[InputLike],
        *,
        model: str,
        instruction: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        request_id: str = "",
        user: str = "",
        timeout: float | None = None,
    ) -> EmbedResult:
        request = embed_request(
            inputs,
            model=model,
            instruction=instruction,
            dimensions=dimensions,
            normalize=normalize,
            request_id=request_id,
            user=user,
        )
        return embed_result(await self.embed_message(request, timeout=timeout))

    async def embed_message(
        self, request: pb.EmbedRequest, *, timeout: float | None = None
    ) -> pb.EmbedResponse:
        """Send a request message as built and return the response message as it came."""
        try:
            response: pb.EmbedResponse = await self._stub.Embed(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_aio(error) from None
        return response

    async def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str,
        dimensions: int | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
    ) -> list[list[float]]:
        """The vectors of ``texts``, in order."""
        result = await self.embed(
            texts, model=model, dimensions=dimensions, normalize=normalize, timeout=timeout
        )
        return result.vectors

    async def stream_embed(
        self,
        inputs: Iterable[InputLike],
        *,
        model: str,
        instruction: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        request_id: str = "",
        user: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Each input's outcome as soon as it is ready, in any order. A failed input
        comes as an item with ``error`` set; a failure of the whole call raises."""
        request = pb.StreamEmbedRequest(
            request=embed_request(
                inputs,
                model=model,
                instruction=instruction,
                dimensions=dimensions,
                normalize=normalize,
                request_id=request_id,
                user=user,
            )
        )
        call = self._stub.StreamEmbed(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            async for message in call:
                yield stream_item(message)
        except grpc.aio.AioRpcError as error:
            raise error_from_aio(error) from None
        finally:
            call.cancel()

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str,
        top_n: int | None = None,
        return_documents: bool = False,
        request_id: str = "",
        user: str = "",
        timeout: float | None = None,
    ) -> RerankResult:
        request = rerank_request(
            query,
            documents,
            model=model,
            top_n=top_n,
            return_documents=return_documents,
            request_id=request_id,
            user=user,
        )
        try:
            response = await self._stub.Rerank(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_aio(error) from None
        return rerank_result(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_aio(error) from None
        return model_infos(response)
