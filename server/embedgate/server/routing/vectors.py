"""Vector post-processing shared by every provider: Matryoshka-style cuts and
normalisation, applied to whole batches with numpy (no per-float Python loops)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from embedgate.server.domain import OutputType
from embedgate.server.errors import InternalError
from embedgate.server.providers.base import Vectors


def shape_vectors(vectors: Vectors, *, dimensions: int | None, normalize: bool) -> Vectors:
    """Cut each row to its first ``dimensions`` values, then scale it to unit length
    when ``normalize`` is set. A cut without renormalising would shrink the vector, so
    callers that want unit vectors get them renormalised after the cut."""
    if vectors.ndim != 2:
        raise InternalError(f"expected a 2-D batch of vectors, got shape {vectors.shape}")
    if dimensions is not None:
        if dimensions > vectors.shape[1]:
            raise InternalError(
                f"asked for {dimensions} dimensions of {vectors.shape[1]}-dimension vectors"
            )
        vectors = vectors[:, :dimensions]
    # One pass gives both the squared lengths and the finiteness check: a NaN or an
    # infinity in a row makes its sum of squares non-finite (then the values are
    # checked themselves, in case only the squares overflowed).
    squares = np.einsum("ij,ij->i", vectors, vectors)
    if not np.isfinite(squares).all():
        if not np.isfinite(vectors).all():
            raise InternalError("the model produced a vector with a NaN or infinite value")
        wide = vectors.astype(np.float64)  # finite values whose squares overflow float32
        squares = np.einsum("ij,ij->i", wide, wide)
    if normalize:
        norms = np.sqrt(squares.astype(np.float64))[:, None]
        # A zero vector has no direction; leave it as it is rather than divide by zero.
        norms[norms == 0] = 1.0
        vectors = vectors / norms
    return np.ascontiguousarray(vectors, dtype=np.float32)


# Little-endian on every platform: the contract fixes the byte order.
_FLOAT32 = np.dtype("<f4")
_FLOAT16 = np.dtype("<f2")


def encode_vectors(vectors: Vectors, output_type: OutputType) -> list[bytes]:
    """Each row of a batch encoded as the contract's ``OutputType`` says, computed for
    the whole batch at once. The integer scales assume values in [-1, 1] (unit
    vectors); anything outside is clipped."""
    encoded: npt.NDArray[Any]
    match output_type:
        case OutputType.FLOAT32:
            encoded = vectors.astype(_FLOAT32, copy=False)
        case OutputType.FLOAT16:
            encoded = vectors.astype(_FLOAT16)
        case OutputType.INT8:
            encoded = np.clip(np.rint(vectors * 127.0), -127, 127).astype(np.int8)
        case OutputType.UINT8:
            encoded = np.clip(np.rint((vectors + 1.0) * 127.5), 0, 255).astype(np.uint8)
        case OutputType.UBINARY:
            encoded = np.packbits(vectors > 0, axis=1)
        case OutputType.BINARY:
            # Cohere-style signed bytes: the packed byte minus 128, i.e. its top bit flipped.
            encoded = np.packbits(vectors > 0, axis=1) ^ np.uint8(0x80)
    return [row.tobytes() for row in encoded]


def decode_float32(payload: bytes) -> Vectors:
    """A float32 payload back into a vector (for scoring cached vectors)."""
    return np.frombuffer(payload, dtype=_FLOAT32).astype(np.float32, copy=False)
