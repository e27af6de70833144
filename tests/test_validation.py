"""Every request is validated before any model work, every violation reported at once,
with the right code, field path and stable reason."""

from __future__ import annotations

import grpc
import pytest
from conftest import (
    LOCAL,
    MULTI,
    PNG_1X1,
    TEXT_ONLY,
    LocalServed,
    Served,
    embed_error,
    rich_error,
)

from embedgate.v1 import embedding_service_pb2 as pb

JPEG_HEAD = b"\xff\xd8\xff\xe0" + b"\x00" * 16
GIF_HEAD = b"GIF89a" + b"\x00" * 16
WEBP_HEAD = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 8


def image(**kwargs: object) -> pb.Image:
    return pb.Image(**kwargs)  # type: ignore[arg-type]


ACCEPTED_CASES = {
    "text": pb.Input(text="hello"),
    "image uri": pb.Input(image=image(uri="https://example.test/cat.png")),
    "image http uri": pb.Input(image=image(uri="http://example.test/cat.png")),
    "image png bytes": pb.Input(image=image(data=PNG_1X1, mime_type="image/png")),
    "image jpeg bytes": pb.Input(image=image(data=JPEG_HEAD)),
    "image gif bytes": pb.Input(image=image(data=GIF_HEAD)),
    "image webp bytes": pb.Input(image=image(data=WEBP_HEAD, mime_type="image/webp")),
    "video": pb.Input(
        video=pb.Video(frames=[image(data=PNG_1X1), image(uri="https://x.test/f.png")])
    ),
    "text_image": pb.Input(text_image=pb.TextImage(text="a cat", image=image(data=PNG_1X1))),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_CASES))
async def test_every_oneof_case_is_accepted_by_a_model_that_takes_it(
    served: Served, case: str
) -> None:
    """Each input case reaches a model that accepts its modality and yields one vector."""
    response = await served.stub.Embed(
        pb.EmbedRequest(model=MULTI, inputs=[ACCEPTED_CASES[case]]), timeout=30
    )
    assert [e.index for e in response.embeddings] == [0]
    assert len(response.embeddings[0].values) == 16


REJECTED_CASES: dict[str, tuple[pb.Input, str, str]] = {
    "oneof unset": (pb.Input(), "inputs[0]", "MISSING_FIELD"),
    "empty text": (pb.Input(text=""), "inputs[0].text", "EMPTY_TEXT"),
    "blank text": (pb.Input(text="  \n"), "inputs[0].text", "EMPTY_TEXT"),
    "image source unset": (
        pb.Input(image=image(mime_type="image/png")),
        "inputs[0].image",
        "MISSING_FIELD",
    ),
    "image bytes not an image": (
        pb.Input(image=image(data=b"%PDF-1.7 not a picture")),
        "inputs[0].image.data",
        "INVALID_IMAGE",
    ),
    "image bytes empty": (pb.Input(image=image(data=b"")), "inputs[0].image.data", "INVALID_IMAGE"),
    "image mime disagrees": (
        pb.Input(image=image(data=PNG_1X1, mime_type="image/jpeg")),
        "inputs[0].image.mime_type",
        "INVALID_IMAGE",
    ),
    "image mime not an image": (
        pb.Input(image=image(uri="https://x.test/a", mime_type="text/html")),
        "inputs[0].image.mime_type",
        "INVALID_IMAGE",
    ),
    "image uri ftp": (
        pb.Input(image=image(uri="ftp://x.test/a.png")),
        "inputs[0].image.uri",
        "INVALID_IMAGE_URI",
    ),
    "image uri file": (
        pb.Input(image=image(uri="file:///etc/passwd")),
        "inputs[0].image.uri",
        "INVALID_IMAGE_URI",
    ),
    "image uri relative": (
        pb.Input(image=image(uri="cat.png")),
        "inputs[0].image.uri",
        "INVALID_IMAGE_URI",
    ),
    "video without frames": (pb.Input(video=pb.Video()), "inputs[0].video.frames", "EMPTY_VIDEO"),
    "video with a bad frame": (
        pb.Input(video=pb.Video(frames=[image(data=PNG_1X1), image(data=b"nope")])),
        "inputs[0].video.frames[1].data",
        "INVALID_IMAGE",
    ),
    "text_image without text": (
        pb.Input(text_image=pb.TextImage(image=image(data=PNG_1X1))),
        "inputs[0].text_image.text",
        "EMPTY_TEXT",
    ),
    "text_image without image": (
        pb.Input(text_image=pb.TextImage(text="a cat")),
        "inputs[0].text_image.image",
        "MISSING_FIELD",
    ),
    "text_image with a bad image uri": (
        pb.Input(text_image=pb.TextImage(text="a cat", image=image(uri="gopher://x"))),
        "inputs[0].text_image.image.uri",
        "INVALID_IMAGE_URI",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED_CASES))
async def test_every_malformed_input_is_rejected_with_its_field_path(
    served: Served, case: str
) -> None:
    """A malformed input is INVALID_ARGUMENT with a BadRequest violation at its path."""
    item, path, reason = REJECTED_CASES[case]
    error = await embed_error(served.stub, pb.EmbedRequest(model=MULTI, inputs=[item]))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [path]
    assert error.violation_reasons[path] == reason
    assert error.reason == reason
    assert path in error.message


async def test_no_inputs_is_invalid(served: Served) -> None:
    """An empty batch is rejected, naming the inputs field."""
    error = await embed_error(served.stub, pb.EmbedRequest(model=TEXT_ONLY))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["inputs"]


async def test_every_violation_is_reported_at_once(served: Served) -> None:
    """Structural and model-level violations come together in one status, in input order."""
    request = pb.EmbedRequest(
        model=TEXT_ONLY,
        dimensions=999,
        instruction="Represent this",
        inputs=[
            pb.Input(text="fine"),
            pb.Input(text=""),
            pb.Input(image=image(data=b"junk")),
            pb.Input(image=image(data=PNG_1X1)),
            pb.Input(),
            pb.Input(video=pb.Video()),
        ]
        + [pb.Input(text="x")] * 5
        + [pb.Input(text="")],
    )
    error = await embed_error(served.stub, request)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_REQUEST"
    assert list(error.violations) == [
        "dimensions",
        "instruction",
        "inputs[1].text",
        "inputs[2].image.data",
        "inputs[3].image",
        "inputs[4]",
        "inputs[5].video.frames",
        "inputs[11].text",
    ]
    assert error.violation_reasons["inputs[3].image"] == "UNSUPPORTED_MODALITY"
    assert error.violation_reasons["dimensions"] == "UNSUPPORTED_DIMENSIONS"
    assert error.violation_reasons["instruction"] == "INSTRUCTION_NOT_SUPPORTED"


@pytest.mark.parametrize(
    ("item", "path", "modality"),
    [
        (pb.Input(image=image(uri="https://x.test/cat.png")), "inputs[0].image", "image"),
        (pb.Input(image=image(data=PNG_1X1)), "inputs[0].image", "image"),
        (pb.Input(video=pb.Video(frames=[image(data=PNG_1X1)])), "inputs[0].video", "video"),
        (
            pb.Input(text_image=pb.TextImage(text="cat", image=image(data=PNG_1X1))),
            "inputs[0].text_image",
            "text_image",
        ),
    ],
)
async def test_a_text_only_model_rejects_other_modalities_naming_models_that_accept_them(
    served: Served, item: pb.Input, path: str, modality: str
) -> None:
    """A model that embeds text only (as the local model does) refuses other inputs:
    INVALID_ARGUMENT that names the input and the configured models that accept it."""
    error = await embed_error(
        served.stub, pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text="ok"), item])
    )
    path = path.replace("inputs[0]", "inputs[1]")
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "UNSUPPORTED_MODALITY"
    assert list(error.violations) == [path]
    description = error.violations[path]
    assert modality in description
    assert MULTI in description
    assert TEXT_ONLY not in description.split("(", 1)[1]


async def test_unknown_model_is_not_found(served: Served) -> None:
    """An unknown model is NOT_FOUND with reason MODEL_NOT_FOUND and the models listed."""
    error = await embed_error(
        served.stub, pb.EmbedRequest(model="no-such", inputs=[pb.Input(text="x")])
    )
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"
    assert error.metadata["model"] == "no-such"
    assert TEXT_ONLY in error.message


async def test_missing_model_is_invalid(served: Served) -> None:
    """An empty model name is a field violation, reported with the other violations."""
    error = await embed_error(served.stub, pb.EmbedRequest(inputs=[pb.Input(text="")]))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["model", "inputs[0].text"]


@pytest.mark.parametrize("dims", [0, 385, 4096])
async def test_dimensions_the_model_cannot_give_are_invalid(served: Served, dims: int) -> None:
    """Zero or more dimensions than the model has is INVALID_ARGUMENT on `dimensions`."""
    error = await embed_error(
        served.stub, pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text="x")], dimensions=dims)
    )
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "UNSUPPORTED_DIMENSIONS"
    assert list(error.violations) == ["dimensions"]


async def test_too_many_inputs_names_the_limit(served: Served) -> None:
    """More inputs than the model takes per call is rejected with the limit in the text."""
    request = pb.EmbedRequest(model=TEXT_ONLY, inputs=[pb.Input(text="x")] * 513)
    error = await embed_error(served.stub, request)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "TOO_MANY_INPUTS"
    assert "513" in error.violations["inputs"]
    assert "512" in error.violations["inputs"]


async def test_provider_limits_are_checked_before_any_model_work(served: Served) -> None:
    """A provider's own per-input check fails the call before the model is called."""
    before = len(served.multi.calls)
    error = await embed_error(
        served.stub,
        pb.EmbedRequest(model=MULTI, inputs=[pb.Input(text="fine"), pb.Input(text="refuse")]),
    )
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"inputs[1].text": "INPUT_TOO_LONG"}
    assert "refuses" in error.violations["inputs[1].text"]
    assert len(served.multi.calls) == before


@pytest.mark.local
async def test_local_model_rejects_texts_longer_than_its_window(
    local_served: LocalServed,
) -> None:
    """A text over the local model's token window is INPUT_TOO_LONG, not silently cut."""
    long_text = "apple " * 400
    error = await embed_error(
        local_served.stub,
        pb.EmbedRequest(model=LOCAL, inputs=[pb.Input(text="ok"), pb.Input(text=long_text)]),
    )
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"inputs[1].text": "INPUT_TOO_LONG"}
    assert "256" in error.violations["inputs[1].text"]


async def test_rerank_validation_reports_every_violation(served: Served) -> None:
    """Rerank checks its query, documents and top_n together."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Rerank(
            pb.RerankRequest(model=TEXT_ONLY, query=" ", documents=["a", "", "c"], top_n=0),
            timeout=30,
        )
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["query", "top_n", "documents[1]"]


async def test_rerank_on_a_model_that_cannot_rerank_is_invalid(served: Served) -> None:
    """Rerank on a model without rerank support names the models that can."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Rerank(
            pb.RerankRequest(model=MULTI, query="q", documents=["a"]), timeout=30
        )
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"model": "RERANK_NOT_SUPPORTED"}
    assert TEXT_ONLY in error.violations["model"]
