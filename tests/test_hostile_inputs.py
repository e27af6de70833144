"""Requests a hostile or careless caller sends get a clear INVALID_ARGUMENT (or the error
they earned), never INTERNAL or UNKNOWN, never an error too big to deliver, never a
traceback in the log, and never model work: malformed URIs, bytes that are not a
request, caller strings thousands of characters long, texts of megabytes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import structlog
from conftest import (
    LOCAL,
    MULTI,
    PNG_1X1,
    TEXT_ONLY,
    LocalServed,
    RichError,
    Served,
    embed_error,
    rich_error,
)
from grpc_health.v1 import health_pb2
from test_fuzz_edge import Outcome, trailer_bytes

from embedgate.v1 import embedding_service_pb2 as pb

BAD_URI = "https://[::1/x.png"
SERVICE = "/embedgate.v1.EmbeddingService/"


def uri_input(uri: str) -> pb.Input:
    return pb.Input(image=pb.Image(uri=uri))


def weight(error: grpc.aio.AioRpcError) -> int:
    return trailer_bytes(
        Outcome(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
    )


@pytest.mark.parametrize(
    "uri",
    [
        BAD_URI,
        "https://host:99999/x.png",
        "https://host:port/x.png",
        "https://exa mple.com/x.png",
        "https://example.com/\x00.png",
        "https:///x.png",
        "https://" + "h" * 9000 + "/x.png",
    ],
)
async def test_a_malformed_image_uri_is_invalid_argument_naming_the_input(
    served: Served, uri: str
) -> None:
    """A URI that urllib cannot parse, or that has no host, a bad port, spaces, control
    characters or an absurd length, is INVALID_IMAGE_URI at the input's path."""
    calls = len(served.multi.calls)
    error = await embed_error(
        served.stub, pb.EmbedRequest(model=MULTI, inputs=[pb.Input(text="ok"), uri_input(uri)])
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"inputs[1].image.uri": "INVALID_IMAGE_URI"}
    assert len(served.multi.calls) == calls


async def test_a_malformed_uri_is_named_in_stream_pipeline_and_rerank(served: Served) -> None:
    """The same rule in StreamEmbed (a video frame), EmbedPipeline (its own status) and
    Rerank's document_inputs."""
    video = pb.Input(video=pb.Video(frames=[pb.Image(data=PNG_1X1), pb.Image(uri=BAD_URI)]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in served.stub.StreamEmbed(
            pb.StreamEmbedRequest(request=pb.EmbedRequest(model=MULTI, inputs=[video])), timeout=10
        ):
            pass
    assert rich_error(caught.value).violation_reasons == {
        "inputs[0].video.frames[1].uri": "INVALID_IMAGE_URI"
    }

    async def one() -> AsyncIterator[pb.EmbedPipelineRequest]:
        yield pb.EmbedPipelineRequest(
            correlation_id="c1",
            request=pb.EmbedRequest(model=MULTI, inputs=[uri_input(BAD_URI)]),
        )

    replies = [reply async for reply in served.stub.EmbedPipeline(one(), timeout=10)]
    assert [r.correlation_id for r in replies] == ["c1"]
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Rerank(
            pb.RerankRequest(
                model=TEXT_ONLY,
                query="a cat",
                document_inputs=[pb.Input(text="x"), uri_input(BAD_URI)],
            ),
            timeout=10,
        )
    assert rich_error(caught.value).violation_reasons["document_inputs[1].image.uri"] == (
        "INVALID_IMAGE_URI"
    )


async def test_a_huge_model_name_is_quoted_cut_and_the_error_arrives(served: Served) -> None:
    """A 5,000-character model name comes back NOT_FOUND (not RESOURCE_EXHAUSTED from an
    oversized trailer): quoted cut to 128 characters, marked with its full length."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Embed(
            pb.EmbedRequest(model="m" * 5000, inputs=[pb.Input(text="a")]), timeout=10
        )
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"
    assert "m" * 128 + "…[cut: 5000 characters]" in error.message
    assert "m" * 129 not in error.message
    assert error.metadata["model"] == "m" * 128 + "…[cut: 5000 characters]"
    assert weight(caught.value) < 2048


async def test_a_huge_media_type_and_correlation_id_are_cut(served: Served) -> None:
    """Other values a caller sends and an error quotes are cut the same way."""
    error = await embed_error(
        served.stub,
        pb.EmbedRequest(
            model=MULTI, inputs=[pb.Input(image=pb.Image(data=PNG_1X1, mime_type="x" * 6000))]
        ),
    )
    assert "[cut: 6000 characters]" in error.violations["inputs[0].image.mime_type"]

    async def twice() -> AsyncIterator[pb.EmbedPipelineRequest]:
        for _ in range(2):
            yield pb.EmbedPipelineRequest(
                correlation_id="c" * 4000,
                request=pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text="same id")]),
            )

    served.multi.slow_down(0)
    replies = [r async for r in served.stub.EmbedPipeline(twice(), timeout=20)]
    for reply in replies:
        if reply.HasField("error"):
            assert len(reply.error.SerializeToString()) < 2048


async def test_thousands_of_violations_are_counted_not_all_listed(served: Served) -> None:
    """3,000 empty inputs: the status lists the violations that fit its budget, counts
    them all in ErrorInfo, and the trailers stay far under 8 KiB."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Embed(
            pb.EmbedRequest(model=MULTI, inputs=[pb.Input(text="")] * 3000), timeout=10
        )
    error: RichError = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert int(error.metadata["violations"]) == 3001  # every empty text, and the count
    listed = int(error.metadata["violations_listed"])
    assert 10 < listed == len(error.violations) < 3001
    assert weight(caught.value) < 6 * 1024


@pytest.mark.parametrize(
    ("method", "kind"),
    [("Embed", "unary"), ("Rerank", "unary"), ("ListModels", "unary"), ("StreamEmbed", "stream")],
)
async def test_bytes_that_are_not_a_request_are_malformed_request(
    served: Served, caplog: pytest.LogCaptureFixture, method: str, kind: str
) -> None:
    """Bytes that do not parse as the method's message: INVALID_ARGUMENT with ErrorInfo
    MALFORMED_REQUEST, one access line, and no traceback anywhere in the log."""
    raw = {"request_serializer": bytes, "response_deserializer": bytes}

    async def send() -> None:
        if kind == "unary":
            await served.channel.unary_unary(SERVICE + method, **raw)(b"\xff\xff", timeout=5)
            return
        async for _ in served.channel.unary_stream(SERVICE + method, **raw)(
            b"\x0a\x05ab", timeout=5
        ):
            pass

    with (
        caplog.at_level(logging.DEBUG),
        structlog.testing.capture_logs() as logs,
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await send()
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert "does not parse" in error.message
    lines = [line for line in logs if line.get("reason") == "MALFORMED_REQUEST"]
    assert [(line["event"], line["method"]) for line in lines] == [("rpc_finished", method)]
    assert not [record for record in caplog.records if record.exc_info], caplog.text


async def test_a_malformed_message_ends_a_pipeline_after_the_good_ones(served: Served) -> None:
    """EmbedPipeline: the requests before the bad bytes are answered, then the stream
    ends INVALID_ARGUMENT / MALFORMED_REQUEST."""
    good = pb.EmbedPipelineRequest(
        correlation_id="ok", request=pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text="x")])
    ).SerializeToString()

    async def messages() -> AsyncIterator[bytes]:
        yield good
        yield b"\x0a\xff"

    stream = served.channel.stream_stream(
        SERVICE + "EmbedPipeline", request_serializer=bytes, response_deserializer=bytes
    )(messages(), timeout=20)
    replies: list[pb.EmbedPipelineResponse] = []

    async def read() -> None:
        async for reply in stream:
            replies.append(pb.EmbedPipelineResponse.FromString(reply))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read()
    assert [r.correlation_id for r in replies] == ["ok"]
    assert rich_error(caught.value).reason == "MALFORMED_REQUEST"


async def test_a_malformed_health_check_is_invalid_argument(served: Served) -> None:
    """Health checks (never counted, never refused) still refuse bytes that do not parse."""
    check = served.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=bytes,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(b"\xff", timeout=5)
    assert rich_error(caught.value).reason == "MALFORMED_REQUEST"
    reply = await check(health_pb2.HealthCheckRequest(service="").SerializeToString(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_text_over_max_text_chars_never_reaches_the_model_checks(served: Served) -> None:
    """A text, a text+image's text or an instruction longer than the model's
    max_text_chars is INPUT_TOO_LONG, found before the model's own checks (a tokenizer)
    see anything."""
    served.multi.checked.clear()
    huge = "x" * 70_000
    error = await embed_error(
        served.stub,
        pb.EmbedRequest(
            model=MULTI,
            instruction="i" * 65_537,
            inputs=[
                pb.Input(text="fine"),
                pb.Input(text=huge),
                pb.Input(text_image=pb.TextImage(text=huge, image=pb.Image(data=PNG_1X1))),
            ],
        ),
    )
    assert error.violation_reasons == {
        "instruction": "INPUT_TOO_LONG",
        "inputs[1].text": "INPUT_TOO_LONG",
        "inputs[2].text_image.text": "INPUT_TOO_LONG",
    }
    assert "has 70000 characters" in error.violations["inputs[1].text"]
    assert "max_text_chars" in error.violations["inputs[1].text"]
    assert all(len(getattr(item, "text", "")) < 65_536 for item in served.multi.checked)


@pytest.mark.local
async def test_a_megabyte_word_is_refused_by_length_before_the_local_tokenizer(
    local_served: LocalServed,
) -> None:
    """The local model's texts are bounded in characters (8,192 by default, shown by
    ListModels): a 2 MB text without spaces, one "word" to the tokenizer, is refused by
    that bound, not counted in tokens."""
    models = await local_served.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    local = next(m for m in models.models if m.name == LOCAL)
    assert local.max_text_chars == 8192
    error = await embed_error(
        local_served.stub, pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text="a" * 2_000_000)])
    )
    assert error.violation_reasons == {"inputs[0].text": "INPUT_TOO_LONG"}
    assert "2000000 characters" in error.violations["inputs[0].text"]
    assert "tokens" not in error.violations["inputs[0].text"]
    response = await local_served.stub.Embed(
        pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text="a" * 8192)]), timeout=30
    )
    assert len(response.embeddings) == 1
