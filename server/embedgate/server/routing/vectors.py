"""Vector post-processing shared by every provider: Matryoshka-style cuts and
normalisation, applied to whole batches with numpy (no per-float Python loops)."""

from __future__ import annotations

import numpy as np

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
    if not np.isfinite(vectors).all():
        raise InternalError("the model produced a vector with a NaN or infinite value")
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # A zero vector has no direction; leave it as it is rather than divide by zero.
        norms[norms == 0] = 1.0
        vectors = vectors / norms
    return np.ascontiguousarray(vectors, dtype=np.float32)
