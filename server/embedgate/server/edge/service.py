"""The ``embedgate.v1.EmbeddingService`` servicer: protobuf ↔ domain, errors → status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import structlog

from embedgate.server.deadlines import deadline_scope
from embedgate.server.domain import EmbedOptions, Input, Modality, ModelInfo, OutputType, Usage
from embedgate.server.edge.access import REQUEST_ID_HEADER, Access, metadata_value
from embedgate.server.edge.convert import parse_embed, parse_rerank
from embedgate.server.edge.guard import allowed_models, check_model
from embedgate.server.edge.paths import invalid_request
from embedgate.server.edge.status import grpc_code, to_rpc_status, trailing_metadata
from embedgate.server.edge.wire import embedding_bytes, embeddings_field
from embedgate.server.errors import (
    EmbedgateError,
    InternalError,
    InvalidRequestError,
    RejectedError,
    Violation,
    echo,
)
from embedgate.server.metrics import Metrics
from embedgate.server.routing.model import Model
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

log = structlog.get_logger("embedgate.access")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

_MODALITIES = {
    Modality.TEXT: pb.MODALITY_TEXT,
    Modality.IMAGE: pb.MODALITY_IMAGE,
    Modality.VIDEO: pb.MODALITY_VIDEO,
    Modality.TEXT_IMAGE: pb.MODALITY_TEXT_IMAGE,
}

T = TypeVar("T")


def _usage(usage: Usage | None) -> pb.Usage | None:
    if usage is None:
        return None
    return pb.Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens)


def model_info_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        provider=info.provider,
        modalities=[_MODALITIES[m] for m in Modality if m in info.modalities],
        max_inputs_per_call=info.max_inputs_per_call,
        default_dimensions=info.dimensions.default,
        allowed_dimensions=list(info.dimensions.allowed),
        min_dimensions=info.dimensions.minimum,
        max_dimensions=info.dimensions.maximum,
        embeds=info.embeds,
        reranks=info.reranks,
        accepts_instruction=info.accepts_instruction,
        max_text_chars=info.max_text_chars,
    )


def _internal(exc: Exception) -> EmbedgateError:
    # Never echo the exception text: it may hold payload or configuration.
    log.exception("rpc_internal_error", error_type=type(exc).__name__)
    return InternalError(f"internal error ({type(exc).__name__})")


def _header_id(context: grpc.aio.ServicerContext[object, object], given: str) -> str:
    """The caller's ``x-request-id`` metadata, if it sent one and the request has no id
    of its own (then the metadata is not read)."""
    if given:
        return ""
    return metadata_value(context.invocation_metadata(), REQUEST_ID_HEADER) or ""


def _count_calls(access: Access, model: Model, calls: int) -> None:
    """How many requests the RPC cost the model behind it (retries not counted)."""
    key = "local_batches" if model.info.in_process else "vendor_calls"
    access.fields[key] = calls


def _ended_by(context: grpc.aio.ServicerContext[object, object]) -> grpc.StatusCode:
    """Why a handler was cancelled: its deadline passed, or the caller went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


_RERANK_METHODS = {
    "vendor": pb.RERANK_METHOD_VENDOR,
    "embedding_cosine": pb.RERANK_METHOD_EMBEDDING_COSINE,
}


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    def __init__(
        self,
        router: Router,
        *,
        default_deadline_s: float = 60.0,
        pipeline_max_in_flight: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics or Metrics()
        self._default_deadline_s = default_deadline_s
        self._pipeline_max_in_flight = pipeline_max_in_flight

    def _resolve(self, model: str) -> Model:
        check_model(model)
        return self._router.resolve(model)

    def _budget(self, context: grpc.aio.ServicerContext[object, object]) -> float:
        """Seconds this RPC may take: the caller's deadline, or the configured default
        for a call that set none. Every vendor call made for the RPC ends by then."""
        remaining = context.time_remaining()
        return self._default_deadline_s if remaining is None else remaining

    async def _run(
        self,
        context: grpc.aio.ServicerContext[object, object],
        access: Access,
        work: Callable[[], Awaitable[T]],
        *,
        finishes: bool = True,
    ) -> T:
        """Run ``work``; map a domain error to its status once and end the RPC with it.
        Log the access line on failure, and on success when ``work`` finishes the RPC."""
        failure: EmbedgateError | None = None
        try:
            with deadline_scope(self._budget(context)):
                result = await work()
        except EmbedgateError as error:
            failure = error
        except asyncio.CancelledError:
            access.emit(_ended_by(context))
            raise
        except Exception as exc:
            failure = _internal(exc)
        if failure is None:
            if finishes:
                context.set_trailing_metadata(access.metadata())
                access.emit(grpc.StatusCode.OK)
            return result
        await self._abort(context, access, failure)
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def _abort(
        self,
        context: grpc.aio.ServicerContext[object, object],
        access: Access,
        failure: EmbedgateError,
    ) -> None:
        status = to_rpc_status(failure)
        access.fields["reason"] = failure.reason
        access.emit(grpc_code(failure))
        await context.abort(
            grpc_code(failure), status.message, (*trailing_metadata(status), *access.metadata())
        )

    async def _prepare_embed(
        self, request: pb.EmbedRequest, access: Access, header_id: str = ""
    ) -> tuple[Model, list[Input], EmbedOptions]:
        parsed = parse_embed(request, header_id)
        access.request_id = parsed.options.request_id
        access.fields.update(
            model=echo(parsed.model),
            inputs=len(request.inputs),
            request_id=parsed.options.request_id,
        )
        if not parsed.model:  # nothing to resolve: report what the edge found
            raise InvalidRequestError(parsed.violations)
        model = self._resolve(parsed.model)
        try:
            inputs = await self._router.validate(model, parsed.inputs, parsed.options)
        except RejectedError as rejected:
            raise invalid_request(
                parsed.violations, rejected, parsed.inputs, "inputs", model.name
            ) from None
        if parsed.violations:
            raise invalid_request(parsed.violations, None, parsed.inputs, "inputs", model.name)
        return model, inputs, parsed.options

    async def Embed(  # noqa: N802 - the RPC's name
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.EmbedResponse:
        access = Access("Embed", self._metrics)

        async def work() -> pb.EmbedResponse:
            response = pb.EmbedResponse()
            await self._embed_into(
                response, request, access, _header_id(context, request.request_id)
            )
            return response

        return await self._run(context, access, work)

    async def _embed_into(
        self,
        response: pb.EmbedResponse,
        request: pb.EmbedRequest,
        access: Access,
        header_id: str = "",
    ) -> None:
        model, inputs, options = await self._prepare_embed(request, access, header_id)
        result = await self._router.embed(model, inputs, options)
        response.model = result.model
        response.request_id = options.request_id
        usage = _usage(result.usage)
        if usage is not None:
            response.usage.CopyFrom(usage)
        response.MergeFromString(
            embeddings_field(
                ((index, item.payload, item.cached) for index, item in enumerate(result.items)),
                floats=options.output_type is OutputType.FLOAT32,
            )
        )
        access.fields["cached_inputs"] = sum(item.cached for item in result.items)
        _count_calls(access, model, result.calls)

    async def StreamEmbed(  # noqa: N802 - the RPC's name
        self, request: pb.StreamEmbedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.StreamEmbedResponse]:
        access = Access("StreamEmbed", self._metrics)
        model, inputs, options = await self._run(
            context,
            access,
            lambda: self._prepare_embed(
                request.request, access, _header_id(context, request.request.request_id)
            ),
            finishes=False,
        )
        failed = 0
        batches: set[int] = set()
        try:
            with deadline_scope(self._budget(context)):
                async for message in self._stream(model, inputs, options, batches):
                    if message.HasField("error"):
                        failed += 1
                    yield message
        except asyncio.CancelledError:
            access.emit(_ended_by(context))
            raise
        except EmbedgateError as error:  # e.g. the deadline passed before every input was done
            await self._abort(context, access, error)
            return
        except Exception as exc:
            await self._abort(context, access, _internal(exc))
            return
        access.fields["failed_inputs"] = failed
        _count_calls(access, model, len(batches))
        context.set_trailing_metadata(access.metadata())
        access.emit(grpc.StatusCode.OK)

    async def _stream(
        self,
        model: Model,
        inputs: list[Input],
        options: EmbedOptions,
        batches: set[int],
    ) -> AsyncIterator[pb.StreamEmbedResponse]:
        """The stream's messages; the ids of the model requests they came from are added
        to ``batches``."""
        name = model.name
        async for item in self._router.embed_each(model, inputs, options):
            message = pb.StreamEmbedResponse(
                index=item.index, model=name, request_id=options.request_id
            )
            if item.error is not None or item.item is None:
                error = item.error or InternalError("no vector was produced")
                message.error.CopyFrom(to_rpc_status(error, index=item.index))
            else:
                encoded = item.item
                if not encoded.cached:
                    batches.add(encoded.batch)
                message.embedding.MergeFromString(
                    embedding_bytes(
                        item.index,
                        encoded.payload,
                        floats=options.output_type is OutputType.FLOAT32,
                        cached=encoded.cached,
                    )
                )
                if encoded.tokens is not None:
                    message.usage.prompt_tokens = encoded.tokens
                    message.usage.total_tokens = encoded.tokens
            yield message

    async def Rerank(  # noqa: N802 - the RPC's name
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RerankResponse:
        access = Access("Rerank", self._metrics)

        async def work() -> pb.RerankResponse:
            parsed = parse_rerank(request, _header_id(context, request.request_id))
            access.fields.update(
                model=echo(parsed.model),
                inputs=len(parsed.documents) + 1,
                request_id=parsed.options.request_id,
            )
            access.request_id = parsed.options.request_id
            if not parsed.model:  # nothing to resolve: report what the edge found
                raise InvalidRequestError(parsed.violations)
            model = self._resolve(parsed.model)
            try:
                inputs = await self._router.validate_rerank(
                    model, parsed.query, parsed.documents, parsed.options
                )
            except RejectedError as rejected:
                raise invalid_request(
                    parsed.violations, rejected, parsed.documents, parsed.field, model.name
                ) from None
            if parsed.violations:
                raise invalid_request(
                    parsed.violations, None, parsed.documents, parsed.field, model.name
                )
            result = await self._router.rerank(
                model, inputs, top_n=parsed.top_n, options=parsed.options
            )
            _count_calls(access, model, result.calls)
            response = pb.RerankResponse(
                model=result.model,
                request_id=parsed.options.request_id,
                usage=_usage(result.usage),
                method=_RERANK_METHODS[result.method],
                query_cached=result.query_cached,
            )
            for ranked in result.ranked:
                item = response.results.add(
                    index=ranked.index, relevance_score=ranked.score, cached=ranked.cached
                )
                if not parsed.return_documents:
                    continue
                if request.document_inputs:
                    item.document_input.CopyFrom(request.document_inputs[ranked.index])
                else:
                    item.document = request.documents[ranked.index]
            return response

        return await self._run(context, access, work)

    async def EmbedPipeline(  # noqa: N802 - the RPC's name
        self,
        request_iterator: AsyncIterator[pb.EmbedPipelineRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.EmbedPipelineResponse]:
        """Serve each request as Embed would, concurrently, with at most
        ``pipeline_max_in_flight`` of them between being read and their result being
        taken by the caller: the next request is read only when one has left, so the
        HTTP/2 flow control slows down a caller that sends faster than it reads."""
        access = Access("EmbedPipeline", self._metrics)
        slots = asyncio.Semaphore(self._pipeline_max_in_flight)
        results: asyncio.Queue[pb.EmbedPipelineResponse | None] = asyncio.Queue()
        in_flight: set[str] = set()
        workers: set[asyncio.Task[None]] = set()
        served = failed = 0

        async def serve(item: pb.EmbedPipelineRequest) -> None:
            await results.put(await self._pipeline_one(item, context, in_flight))

        async def read() -> EmbedgateError | None:
            """Read and serve every request; what ended the stream early, if anything."""
            ended = None
            try:
                requests = aiter(request_iterator)
                while True:
                    await slots.acquire()
                    try:
                        item = await anext(requests)
                    except StopAsyncIteration:
                        break
                    except EmbedgateError as error:  # bytes that do not parse: the requests
                        ended = error  # before them are still answered, then it ends
                        break
                    worker = asyncio.create_task(serve(item))
                    workers.add(worker)
                    worker.add_done_callback(workers.discard)
                while workers:
                    await asyncio.wait(set(workers))
            finally:
                await results.put(None)
            return ended

        reader = asyncio.create_task(read())
        try:
            while (reply := await results.get()) is not None:
                served += 1
                failed += reply.HasField("error")
                yield reply
                slots.release()
            ended = await reader  # a failure to read the stream surfaces here
        except asyncio.CancelledError:
            access.emit(_ended_by(context))
            raise
        finally:
            reader.cancel()
            for worker in list(workers):
                worker.cancel()
        access.fields.update(requests=served, failed_requests=failed)
        if ended is not None:
            await self._abort(context, access, ended)
            return
        access.emit(grpc.StatusCode.OK)

    async def _pipeline_one(
        self,
        item: pb.EmbedPipelineRequest,
        context: grpc.aio.ServicerContext[object, object],
        in_flight: set[str],
    ) -> pb.EmbedPipelineResponse:
        """One pipeline request, answered with its response or its own error status."""
        reply = pb.EmbedPipelineResponse(correlation_id=item.correlation_id)
        access = Access("EmbedPipeline.request", self._metrics)
        correlation = item.correlation_id
        try:
            if not correlation:
                raise InvalidRequestError(
                    [
                        Violation(
                            "correlation_id",
                            "is required: an id the result is returned with",
                            "MISSING_FIELD",
                        )
                    ]
                )
            if correlation in in_flight:
                raise InvalidRequestError(
                    [
                        Violation(
                            "correlation_id",
                            f"{echo(correlation)!r} is already in flight on this stream",
                            "DUPLICATE_CORRELATION_ID",
                        )
                    ]
                )
            in_flight.add(correlation)
            try:
                with deadline_scope(self._budget(context)):
                    await self._embed_into(reply.response, item.request, access)
            finally:
                in_flight.discard(correlation)
        except EmbedgateError as error:
            reply.error.CopyFrom(to_rpc_status(error))
        except Exception as exc:
            reply.error.CopyFrom(to_rpc_status(_internal(exc)))
        return reply

    async def ListModels(  # noqa: N802 - the RPC's name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListModelsResponse:
        access = Access("ListModels", self._metrics)

        async def work() -> pb.ListModelsResponse:
            allowed = allowed_models()
            return pb.ListModelsResponse(
                models=[
                    model_info_message(info)
                    for info in self._router.models()
                    if allowed is None or info.name in allowed
                ]
            )

        return await self._run(context, access, work)
