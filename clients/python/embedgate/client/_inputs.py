"""Building ``embedgate.v1.Input`` messages, one helper per ``oneof`` case."""

from __future__ import annotations

from collections.abc import Iterable

from embedgate.v1 import embedding_service_pb2 as pb

InputLike = str | pb.Input
"""A plain string is a text input; anything else is given as an ``Input`` message."""


def text(value: str) -> pb.Input:
    return pb.Input(text=value)


def image_uri(uri: str, *, mime_type: str | None = None) -> pb.Input:
    return pb.Input(image=_image(uri=uri, mime_type=mime_type))


def image_bytes(data: bytes, *, mime_type: str | None = None) -> pb.Input:
    return pb.Input(image=_image(data=data, mime_type=mime_type))


def video(frames: Iterable[pb.Image | bytes | str]) -> pb.Input:
    """A video from its frames in order: each ``bytes`` (image file), ``str`` (URI) or
    an ``Image`` message."""
    return pb.Input(video=pb.Video(frames=[_frame(frame) for frame in frames]))


def text_image(value: str, image: pb.Image | bytes | str) -> pb.Input:
    """A text and an image embedded together into one vector."""
    return pb.Input(text_image=pb.TextImage(text=value, image=_frame(image)))


def to_input(item: InputLike) -> pb.Input:
    return pb.Input(text=item) if isinstance(item, str) else item


def _frame(frame: pb.Image | bytes | str) -> pb.Image:
    if isinstance(frame, bytes):
        return _image(data=frame)
    if isinstance(frame, str):
        return _image(uri=frame)
    return frame


def _image(
    *, uri: str | None = None, data: bytes | None = None, mime_type: str | None = None
) -> pb.Image:
    image = pb.Image()
    if uri is not None:
        image.uri = uri
    if data is not None:
        image.data = data
    if mime_type is not None:
        image.mime_type = mime_type
    return image
