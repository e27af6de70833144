"""The asyncio client (``grpc.aio``)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Unpack

import grpc

from embedgate.client._errors import error_from_aio
from embedgate.client._inputs import InputLike
from embedgate.client._types import (
    CHANNEL_OPTIONS,
    EmbedOptions,
    EmbedResult,
    ModelInfo,
    PipelineResult,
    RerankOptions,
    RerankResult,
    StreamItem,
    Vector,
    embed_request,
    embed_result,
    model_infos,
    pipeline_result,
    rerank_request,
    rerank_result,
    stream_item,
    with_token,
)
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

Metadata = Sequence[tuple[str, str]]


class AsyncClient:
    """An asyncio embedgate client over one ``grpc.aio`` channel.

    ``timeout`` (seconds) is the deadline of each call unless a call gives its own;
    ``None`` means no deadline. ``token`` is sent as ``authorization: Bearer <token>``
    on every call; ``credentials`` (``grpc.ssl_channel_credentials(...)``) make the
    channel TLS, or mutual TLS with a client key and certificate. Failures raise
    :class:`EmbedgateError` subclasses.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 60.0,
        metadata: Metadata = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._own_channel = channel is None
        if channel is None:
            options = list(CHANNEL_OPTIONS)
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=options)
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._channel = channel
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = with_token(metadata, token)

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
        timeout: float | None = None,
        **options: Unpack[EmbedOptions],
    ) -> EmbedResult:
        """One vector per input, in order. ``options``: instruction, dimensions,
        normalize, request_id, user."""
        request = embed_request(inputs, model=model, **options)
        return embed_result(await self.embed_message(request, timeout=timeout), request.output_type)

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
    ) -> Vector:
        """The vectors of ``texts``, in order: a float32 array, one row per text."""
        result = await self.embed(
            texts, model=model, dimensions=dimensions, normalize=normalize, timeout=timeout
        )
        return result.vectors

    async def stream_embed(
        self,
        inputs: Iterable[InputLike],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[EmbedOptions],
    ) -> AsyncIterator[StreamItem]:
        """Each input's outcome as soon as it is ready, in any order. A failed input
        comes as an item with ``error`` set; a failure of the whole call raises."""
        request = pb.StreamEmbedRequest(request=embed_request(inputs, model=model, **options))
        call = self._stub.StreamEmbed(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            async for message in call:
                yield stream_item(message, request.request.output_type)
        except grpc.aio.AioRpcError as error:
            raise error_from_aio(error) from None
        finally:
            call.cancel()

    async def embed_pipeline(
        self,
        requests: AsyncIterable[tuple[str, Iterable[InputLike]]]
        | Iterable[tuple[str, Iterable[InputLike]]],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[EmbedOptions],
    ) -> AsyncIterator[PipelineResult]:
        """Send ``(correlation_id, inputs)`` requests down one stream and get each
        one's result as soon as it is done, in any order, tagged with its id. The
        server bounds the requests in flight; when it is busy, sending waits.
        ``timeout`` bounds the whole stream (give a long one for a long job)."""
        output_type = embed_request([], model=model, **options).output_type

        def message(correlation_id: str, inputs: Iterable[InputLike]) -> pb.EmbedPipelineRequest:
            return pb.EmbedPipelineRequest(
                correlation_id=correlation_id,
                request=embed_request(inputs, model=model, **options),
            )

        async def messages() -> AsyncIterator[pb.EmbedPipelineRequest]:
            if isinstance(requests, AsyncIterable):
                async for correlation_id, inputs in requests:
                    yield message(correlation_id, inputs)
            else:
                for correlation_id, inputs in requests:
                    yield message(correlation_id, inputs)

        call = self._stub.EmbedPipeline(
            messages(), timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            async for reply in call:
                yield pipeline_result(reply, output_type)
        except grpc.aio.AioRpcError as error:
            raise error_from_aio(error) from None
        finally:
            call.cancel()

    async def rerank(
        self,
        query: str,
        documents: Sequence[InputLike],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[RerankOptions],
    ) -> RerankResult:
        """Documents best first. ``options``: top_n, return_documents, request_id, user,
        no_cache. Documents are texts, or input messages (images, videos...) for a
        model that embeds them: a text query can rank images."""
        request = rerank_request(query, documents, model=model, **options)
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
