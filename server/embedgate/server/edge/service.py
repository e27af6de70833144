"""The ``embedgate.v1.EmbeddingService`` servicer: each RPC parsed (``convert.py``),
served through the router, and answered; a failure ends an RPC, or a stream's message,
one way (``_serving``, ``failure_of``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager

import grpc
import structlog

from embedgate.server import tracing
from embedgate.server.deadlines import deadline_scope
from embedgate.server.domain import EmbedOptions, Input, TextInput
from embedgate.server.edge.access import (
    REQUEST_ID_HEADER,
    Access,
    metadata_value,
)
from embedgate.server.edge.callers import Callers
from embedgate.server.edge.convert import (
    fill_embed_response,
    models_response,
    parse_embed,
    parse_rerank,
    rerank_response,
    stream_failure,
    stream_message,
)
from embedgate.server.edge.guard import allowed_models, check_model
from embedgate.server.edge.paths import validated
from embedgate.server.edge.pipeline import Window
from embedgate.server.edge.status import grpc_code, to_rpc_status, trailing_metadata
from embedgate.server.errors import (
    EmbedgateError,
    InternalError,
    InvalidRequestError,
    Reason,
    Violation,
    echo,
    unexpected,
)
from embedgate.server.metrics import Metrics
from embedgate.server.routing.embedding import Encoded
from embedgate.server.routing.model import Model
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

log = structlog.get_logger("embedgate.access")

Context = grpc.aio.ServicerContext[object, object]


def failure_of(exc: Exception) -> EmbedgateError:
    """What an RPC or a stream's message fails with: the gateway's own error, or the
    internal error (logged here with its traceback, never echoed to the caller)."""
    error = unexpected(exc)
    if isinstance(error, InternalError) and error.__cause__ is not None:
        cause = error.__cause__
        log.error(
            "rpc_internal_error",
            error_type=type(cause).__name__,
            exc_info=cause,
        )
    return error


def _header_id(context: Context, given: str) -> str:
    """The caller's ``x-request-id`` metadata, if it sent one and the request has no id
    of its own (then the metadata is not read)."""
    if given:
        return ""
    return metadata_value(context.invocation_metadata(), REQUEST_ID_HEADER) or ""


def _count_calls(access: Access, model: Model, calls: int, deployments: Sequence[str] = ()) -> None:
    """How many requests the RPC cost the model behind it (retries not counted), and
    which deployments served them, for a model with several."""
    key = "local_batches" if model.info.in_process else "vendor_calls"
    access.fields[key] = calls
    if deployments:
        access.fields["deployments"] = ",".join(deployments)


def _own_tokens(items: Sequence[Encoded | None]) -> int | None:
    """The tokens of a stream's inputs when the model counted each one's own (else None:
    an estimate stands in)."""
    total = 0
    for item in items:
        if item is None or item.cached:
            continue
        if item.tokens is None:
            return None
        total += item.tokens
    return total


def _ended_by(context: Context) -> grpc.StatusCode:
    """Why a handler was cancelled: its deadline passed, or the caller went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    def __init__(
        self,
        router: Router,
        *,
        default_deadline_s: float = 60.0,
        pipeline_max_in_flight: int = 64,
        metrics: Metrics | None = None,
        callers: Callers | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics or Metrics()
        self._callers = callers or Callers(self._metrics)
        self._default_deadline_s = default_deadline_s
        self._pipeline_max_in_flight = pipeline_max_in_flight

    def _resolve(self, model: str) -> Model:
        check_model(model)
        return self._router.resolve(model)

    def _budget(self, context: Context) -> float:
        """Seconds this RPC may take: the caller's deadline, or the configured default
        for a call that set none. Every vendor call made for the RPC ends by then."""
        remaining = context.time_remaining()
        return self._default_deadline_s if remaining is None else remaining

    @asynccontextmanager
    async def _serving(self, context: Context, access: Access) -> AsyncIterator[None]:
        """Serve an RPC within its deadline (the caller's, or the configured default for
        a call that set none: every vendor call made for it ends by then). On success
        the access line and trailing metadata go out; any failure ends the RPC with its
        status, mapped once, and the access line."""
        metadata = context.invocation_metadata()
        caller = self._callers.name_of(metadata)
        access.caller = access.fields["caller"] = caller
        with tracing.server_span(metadata, access.describe_span) as span:
            access.span = span
            try:
                with deadline_scope(self._budget(context)):
                    yield
            except asyncio.CancelledError:
                access.emit(_ended_by(context))
                raise
            except Exception as exc:
                failure = failure_of(exc)
                status = to_rpc_status(failure)
                access.fields["reason"] = failure.reason
                access.emit(grpc_code(failure))
                await context.abort(
                    grpc_code(failure),
                    status.message,
                    (*trailing_metadata(status), *access.metadata()),
                )
            context.set_trailing_metadata(access.metadata())
            access.emit(grpc.StatusCode.OK)

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
        inputs = await validated(
            self._router.validate(model, parsed.inputs, parsed.options),
            parsed.violations,
            parsed.inputs,
            "inputs",
            model.name,
        )
        return model, inputs, parsed.options

    async def Embed(  # noqa: N802 - the RPC's name
        self, request: pb.EmbedRequest, context: Context
    ) -> pb.EmbedResponse:
        access = Access("Embed", self._metrics)
        response = pb.EmbedResponse()
        async with self._serving(context, access):
            await self._embed_into(
                response, request, access, _header_id(context, request.request_id)
            )
        return response

    async def _embed_into(
        self,
        response: pb.EmbedResponse,
        request: pb.EmbedRequest,
        access: Access,
        header_id: str = "",
    ) -> None:
        model, inputs, options = await self._prepare_embed(request, access, header_id)
        async with self._callers.billed(access, model, inputs) as bill:
            result = await self._router.embed(model, inputs, options)
            bill.embedded(
                tokens=result.usage.prompt_tokens if result.usage is not None else None,
                model_requests=result.calls,
                items=result.items,
            )
        fill_embed_response(response, result, options)
        access.fields["cached_inputs"] = sum(item.cached for item in result.items)
        _count_calls(access, model, result.calls, result.deployments)

    async def StreamEmbed(  # noqa: N802 - the RPC's name
        self, request: pb.StreamEmbedRequest, context: Context
    ) -> AsyncIterator[pb.StreamEmbedResponse]:
        access = Access("StreamEmbed", self._metrics)
        async with self._serving(context, access):
            model, inputs, options = await self._prepare_embed(
                request.request, access, _header_id(context, request.request.request_id)
            )
            failed = 0
            batches: set[int] = set()
            served: set[str] = set()
            vectors: list[Encoded | None] = [None] * len(inputs)
            async with self._callers.billed(access, model, inputs) as bill:
                async for item in self._router.embed_each(model, inputs, options):
                    if item.item is None:
                        failed += 1
                        error = item.error or InternalError("no vector was produced")
                        status = to_rpc_status(error, index=item.index)
                        message = stream_failure(item.index, status, model.name, options)
                    else:
                        vectors[item.index] = item.item
                        if not item.item.cached:
                            batches.add(item.item.batch)
                            if item.item.deployment:
                                served.add(item.item.deployment)
                        message = stream_message(item.index, item.item, model.name, options)
                    yield message
                bill.embedded(
                    tokens=_own_tokens(vectors), model_requests=len(batches), items=vectors
                )
            access.fields["failed_inputs"] = failed
            _count_calls(access, model, len(batches), sorted(served))

    async def Rerank(  # noqa: N802 - the RPC's name
        self, request: pb.RerankRequest, context: Context
    ) -> pb.RerankResponse:
        access = Access("Rerank", self._metrics)
        async with self._serving(context, access):
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
            inputs = await validated(
                self._router.validate_rerank(model, parsed.query, parsed.documents, parsed.options),
                parsed.violations,
                parsed.documents,
                parsed.field,
                model.name,
            )
            query = [TextInput(parsed.query)] if parsed.query is not None else []
            async with self._callers.billed(access, model, [*query, *inputs]) as bill:
                result = await self._router.rerank(
                    model, inputs, top_n=parsed.top_n, options=parsed.options
                )
                bill.embedded(
                    tokens=result.usage.prompt_tokens if result.usage is not None else None,
                    model_requests=result.calls,
                    deployments=result.deployments,
                )
            _count_calls(access, model, result.calls, result.deployments)
            response = rerank_response(result, request, parsed.options)
        return response

    async def EmbedPipeline(  # noqa: N802 - the RPC's name
        self,
        request_iterator: AsyncIterator[pb.EmbedPipelineRequest],
        context: Context,
    ) -> AsyncIterator[pb.EmbedPipelineResponse]:
        """Serve each request as Embed would, concurrently, with at most
        ``pipeline_max_in_flight`` of them between being read and their result being
        taken by the caller (see ``pipeline.Window``)."""
        access = Access("EmbedPipeline", self._metrics)
        async with self._serving(context, access):
            in_flight: set[str] = set()
            served = failed = 0
            window = Window(
                request_iterator,
                lambda item: self._pipeline_one(item, context, in_flight, access.caller),
                self._pipeline_max_in_flight,
            )
            async with aclosing(window.replies()) as replies:
                async for reply in replies:
                    served += 1
                    failed += reply.HasField("error")
                    yield reply
            access.fields.update(requests=served, failed_requests=failed)
            if window.ended is not None:
                raise window.ended

    async def _pipeline_one(
        self,
        item: pb.EmbedPipelineRequest,
        context: Context,
        in_flight: set[str],
        caller: str,
    ) -> pb.EmbedPipelineResponse:
        """One pipeline request, answered with its response or its own error status."""
        reply = pb.EmbedPipelineResponse(correlation_id=item.correlation_id)
        access = Access("EmbedPipeline.request", self._metrics)
        access.caller = caller
        correlation = item.correlation_id
        try:
            if not correlation:
                raise InvalidRequestError(
                    [
                        Violation(
                            "correlation_id",
                            "is required: an id the result is returned with",
                            Reason.MISSING_FIELD,
                        )
                    ]
                )
            if correlation in in_flight:
                raise InvalidRequestError(
                    [
                        Violation(
                            "correlation_id",
                            f"{echo(correlation)!r} is already in flight on this stream",
                            Reason.DUPLICATE_CORRELATION_ID,
                        )
                    ]
                )
            in_flight.add(correlation)
            try:
                with deadline_scope(self._budget(context)):
                    await self._embed_into(reply.response, item.request, access)
            finally:
                in_flight.discard(correlation)
        except Exception as exc:
            reply.error.CopyFrom(to_rpc_status(failure_of(exc)))
        return reply

    async def ListModels(  # noqa: N802 - the RPC's name
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        access = Access("ListModels", self._metrics)
        async with self._serving(context, access):
            allowed = allowed_models()
            response = models_response(
                info for info in self._router.listing() if allowed is None or info.name in allowed
            )
        return response
