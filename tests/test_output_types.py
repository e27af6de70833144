"""Compact output types, end to end: each encoding checked against the contract's
formulas computed here from the fake vendor's vectors, through Embed, StreamEmbed and
the Python client; and the wire-format writer against the protobuf runtime."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from conftest import rich_error
from fakes import fake_vector, item_key
from vendor_world import VendorWorld, embed, texts

from embedgate.client import AsyncClient
from embedgate.server.edge.wire import embedding_bytes, embeddings_field
from embedgate.v1 import embedding_service_pb2 as pb

WORDS = ("north", "south", "east")


def reference(output_type: int, vectors: npt.NDArray[np.float32]) -> list[bytes]:
    """The contract's definition of each output type, written out independently."""
    out: list[bytes] = []
    for v in vectors.astype(np.float64):
        if output_type == pb.OUTPUT_TYPE_FLOAT16:
            out.append(b"".join(np.float16(x).astype("<f2").tobytes() for x in v))
        elif output_type == pb.OUTPUT_TYPE_INT8:
            out.append(bytes(int(max(-127, min(127, round(x * 127)))) & 0xFF for x in v))
        elif output_type == pb.OUTPUT_TYPE_UINT8:
            out.append(bytes(int(max(0, min(255, round((x + 1) * 127.5)))) for x in v))
        else:
            bits = "".join("1" if x > 0 else "0" for x in v)
            bits += "0" * (-len(bits) % 8)
            packed = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
            if output_type == pb.OUTPUT_TYPE_BINARY:
                packed = [(b - 128) & 0xFF for b in packed]
            out.append(bytes(packed))
    return out


def unit(words: tuple[str, ...], dims: int) -> npt.NDArray[np.float32]:
    rows = np.stack([fake_vector(item_key(text=w), 1536)[:dims] for w in words])
    scaled: npt.NDArray[np.float32] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(
        np.float32
    )
    return scaled


COMPACT = [
    pb.OUTPUT_TYPE_FLOAT16,
    pb.OUTPUT_TYPE_INT8,
    pb.OUTPUT_TYPE_UINT8,
    pb.OUTPUT_TYPE_BINARY,
    pb.OUTPUT_TYPE_UBINARY,
]


@pytest.mark.parametrize("output_type", COMPACT, ids=lambda t: pb.OutputType.Name(t))
@pytest.mark.parametrize("dimensions", [1536, 12])
async def test_compact_outputs_follow_the_contract(
    world: VendorWorld, output_type: int, dimensions: int
) -> None:
    """Bytes in `data`, nothing in `values`, exactly as the contract's formulas say
    (int8 may differ by one step where float rounding lands on .5)."""
    response = await embed(
        world, "openai", texts(*WORDS), output_type=output_type, dimensions=dimensions
    )
    want = reference(output_type, unit(WORDS, dimensions))
    for embedding, expected in zip(response.embeddings, want, strict=True):
        assert not embedding.values
        assert len(embedding.data) == len(expected)
        if output_type == pb.OUTPUT_TYPE_FLOAT16:
            assert embedding.data == expected
        elif output_type in (pb.OUTPUT_TYPE_INT8, pb.OUTPUT_TYPE_UINT8):
            kind = np.int8 if output_type == pb.OUTPUT_TYPE_INT8 else np.uint8
            got = np.frombuffer(embedding.data, kind).astype(int)
            assert np.abs(got - np.frombuffer(expected, kind).astype(int)).max() <= 1
        else:
            assert embedding.data == expected
    # A default size of 1536 packs into 192 bytes; 12 values into 2.
    if output_type in (pb.OUTPUT_TYPE_BINARY, pb.OUTPUT_TYPE_UBINARY):
        assert len(response.embeddings[0].data) == -(-dimensions // 8)


async def test_float32_stays_in_values(world: VendorWorld) -> None:
    """An unset or FLOAT32 output type gives the vector in `values`, as the vendor gave it
    (normalised), and nothing in `data`."""
    for output_type in (pb.OUTPUT_TYPE_UNSPECIFIED, pb.OUTPUT_TYPE_FLOAT32):
        response = await embed(world, "openai", texts(*WORDS), output_type=output_type)
        got = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
        np.testing.assert_allclose(got, unit(WORDS, 1536), atol=1e-6)
        assert all(not e.data for e in response.embeddings)


async def test_stream_embed_encodes_each_input(world: VendorWorld) -> None:
    """StreamEmbed encodes each input's vector in the output type asked for, as Embed does."""
    request = pb.EmbedRequest(model="openai", inputs=texts(*WORDS), output_type=pb.OUTPUT_TYPE_INT8)
    call = world.stub.StreamEmbed(pb.StreamEmbedRequest(request=request), timeout=10)
    by_index = {m.index: m.embedding.data async for m in call}
    want = reference(pb.OUTPUT_TYPE_INT8, unit(WORDS, 1536))
    for index, data in by_index.items():
        diff = np.frombuffer(data, np.int8).astype(int) - np.frombuffer(want[index], np.int8)
        assert np.abs(diff).max() <= 1


async def test_an_unknown_output_type_is_refused(world: VendorWorld) -> None:
    """An output type the contract does not define is INVALID_ARGUMENT on `output_type`
    (UNSUPPORTED_OUTPUT_TYPE), and the vendor is not called."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed(world, "openai", texts("x"), output_type=42)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violation_reasons == {"output_type": "UNSUPPORTED_OUTPUT_TYPE"}
    assert world.fake_of("openai").received == []


@pytest.mark.parametrize(
    ("name", "dtype", "width"),
    [
        ("float32", np.float32, 1536),
        ("float16", np.float16, 1536),
        ("int8", np.int8, 1536),
        ("uint8", np.uint8, 1536),
        ("binary", np.int8, 192),
        ("ubinary", np.uint8, 192),
    ],
)
async def test_the_python_client_returns_numpy_arrays(
    world: VendorWorld, name: Any, dtype: type[np.generic], width: int
) -> None:
    """The Python client returns each output type as a numpy array of its dtype and width,
    from embed and stream_embed, with the values the contract's formulas give."""
    async with AsyncClient(world.target) as client:
        result = await client.embed(list(WORDS), model="openai", output_type=name)
        assert result.vectors.dtype == dtype
        assert result.vectors.shape == (3, width)
        assert result.output_type == name
        items = [
            item async for item in client.stream_embed(["x"], model="openai", output_type=name)
        ]
        assert items[0].vector is not None
        assert items[0].vector.dtype == dtype
    if name == "float16":
        np.testing.assert_allclose(result.vectors, unit(WORDS, 1536), atol=1e-3)
    if name == "int8":
        np.testing.assert_allclose(result.vectors / 127, unit(WORDS, 1536), atol=1 / 127)


@pytest.mark.parametrize("index", [0, 1, 127, 128, 300_000])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("floats", [False, True])
def test_the_wire_writer_agrees_with_the_protobuf_runtime(
    index: int, cached: bool, floats: bool
) -> None:
    """The hand-written wire format of an Embedding (any index, cached or not, floats or
    bytes) parses to the message the protobuf runtime builds, alone and repeated in a
    response."""
    values = np.linspace(-1, 1, 7, dtype=np.float32)
    payload = values.astype("<f4").tobytes() if floats else b"\x01\x80\xff"
    built = pb.Embedding(index=index, cached=cached)
    if floats:
        built.values.extend(values.tolist())
    else:
        built.data = payload
    parsed = pb.Embedding.FromString(embedding_bytes(index, payload, floats=floats, cached=cached))
    assert parsed == built
    response = pb.EmbedResponse(model="m")
    response.MergeFromString(embeddings_field([(index, payload, cached)] * 2, floats=floats))
    assert list(response.embeddings) == [built, built]
    assert response.model == "m"
