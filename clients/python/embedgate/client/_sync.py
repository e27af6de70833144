"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Unpack

import grpc

from embedgate.client._errors import error_from_rpc
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


class Client:
    """A blocking embedgate client over one channel.

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
        channel: grpc.Channel | None = None,
        timeout: float | None = 60.0,
        metadata: Metadata = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._own_channel = channel is None
        if channel is None:
            options = list(CHANNEL_OPTIONS)
            if credentials is None:
                channel = grpc.insecure_channel(target, options=options)
            else:
                channel = grpc.secure_channel(target, credentials, options=options)
        self._channel = channel
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = with_token(metadata, token)

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def embed(
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
        return embed_result(self.embed_message(request, timeout=timeout), request.output_type)

    def embed_message(
        self, request: pb.EmbedRequest, *, timeout: float | None = None
    ) -> pb.EmbedResponse:
        """Send a request message as built and return the response message as it came."""
        try:
            response: pb.EmbedResponse = self._stub.Embed(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return response

    def embed_texts(
        self,
        texts: Iterable[str],
        *,
        model: str,
        dimensions: int | None = None,
        normalize: bool | None = None,
        timeout: float | None = None,
    ) -> Vector:
        """The vectors of ``texts``, in order: a float32 array, one row per text."""
        return self.embed(
            texts, model=model, dimensions=dimensions, normalize=normalize, timeout=timeout
        ).vectors

    def stream_embed(
        self,
        inputs: Iterable[InputLike],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[EmbedOptions],
    ) -> Iterator[StreamItem]:
        """Each input's outcome as soon as it is ready, in any order. A failed input
        comes as an item with ``error`` set; a failure of the whole call raises."""
        request = pb.StreamEmbedRequest(request=embed_request(inputs, model=model, **options))
        call = self._stub.StreamEmbed(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            for message in call:
                yield stream_item(message, request.request.output_type)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()

    def embed_pipeline(
        self,
        requests: Iterable[tuple[str, Iterable[InputLike]]],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[EmbedOptions],
    ) -> Iterator[PipelineResult]:
        """Send ``(correlation_id, inputs)`` requests down one stream and get each
        one's result as soon as it is done, in any order, tagged with its id. The
        server bounds the requests in flight; when it is busy, sending waits.
        ``timeout`` bounds the whole stream (give a long one for a long job)."""
        output_type = embed_request([], model=model, **options).output_type
        messages = (
            pb.EmbedPipelineRequest(
                correlation_id=correlation_id,
                request=embed_request(inputs, model=model, **options),
            )
            for correlation_id, inputs in requests
        )
        call = self._stub.EmbedPipeline(
            messages, timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            for reply in call:
                yield pipeline_result(reply, output_type)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()

    def rerank(
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
            response = self._stub.Rerank(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return rerank_result(response)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return model_infos(response)
