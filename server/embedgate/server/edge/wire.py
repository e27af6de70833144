"""Embeddings written straight into protobuf wire format.

Setting ``Embedding.values`` from Python walks every float through the interpreter
(a 1024-value vector costs tens of microseconds). The vectors are already encoded
bytes, so this writes each ``Embedding`` message's bytes around them and lets the
protobuf runtime parse the lot in C with one ``MergeFromString`` call.
"""

from __future__ import annotations

from collections.abc import Iterable

from embedgate.v1 import embedding_service_pb2 as pb

_LEN = 2  # wire type of length-delimited fields (bytes, messages, packed floats)
_VARINT = 0


def _tag(message: type[pb.Embedding] | type[pb.EmbedResponse], field: str, wire_type: int) -> bytes:
    number = message.DESCRIPTOR.fields_by_name[field].number
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_INDEX = _tag(pb.Embedding, "index", _VARINT)
_VALUES = _tag(pb.Embedding, "values", _LEN)  # packed repeated float
_DATA = _tag(pb.Embedding, "data", _LEN)
_CACHED = _tag(pb.Embedding, "cached", _VARINT) + b"\x01"
_EMBEDDINGS = _tag(pb.EmbedResponse, "embeddings", _LEN)


def embedding_bytes(index: int, payload: bytes, *, floats: bool, cached: bool) -> bytes:
    """One ``Embedding`` message: ``payload`` is little-endian float32 values when
    ``floats`` (it goes in ``values``), else the encoded vector (``data``)."""
    parts = []
    if index:
        parts.append(_INDEX + _varint(index))
    if payload:
        parts.append((_VALUES if floats else _DATA) + _varint(len(payload)))
        parts.append(payload)
    if cached:
        parts.append(_CACHED)
    return b"".join(parts)


def embeddings_field(items: Iterable[tuple[int, bytes, bool]], *, floats: bool) -> bytes:
    """``EmbedResponse.embeddings`` for ``(index, payload, cached)`` items, ready for
    ``EmbedResponse.MergeFromString``."""
    parts = []
    for index, payload, cached in items:
        body = embedding_bytes(index, payload, floats=floats, cached=cached)
        parts.append(_EMBEDDINGS + _varint(len(body)))
        parts.append(body)
    return b"".join(parts)
