"""The Baidu Qianfan fake. Follows the Qianfan v2 embeddings API document.

Rules enforced: the API lives under `/v2`; `model` is required and one of the document's
table (case-insensitive; any other is 404); `user` is a string; `encoding_format` is float
only. The text models take a non-empty list of non-empty strings, with the table's count
and character limits (token limits need Baidu's tokenizer: only characters are checked);
gme-qwen2-vl-2b-instruct takes one `{"text", "image"}` object, either or both non-empty,
for one fused vector. The vector size is the model's (a test's `dims` overrides it). The
reply adds `id` ("as-...") and `created`. Errors are `{"id", "code", "message", "type"}`
with Qianfan's codes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

from .base import (
    FakeVendor,
    Job,
    Rejected,
    count_tokens,
    error_type,
    item_key,
    string_list,
    typed_field,
    wants_base64,
)


@dataclass(frozen=True)
class Model:
    """One row of the document's model table."""

    max_texts: int
    max_chars: int
    dims: int
    multimodal: bool = False


# The document's table.
MODELS = {
    "embedding-v1": Model(16, 1000, 384),
    "bge-large-zh": Model(16, 2000, 1024),
    "bge-large-en": Model(16, 2000, 1024),
    "tao-8k": Model(1, 28000, 1024),
    "gme-qwen2-vl-2b-instruct": Model(1, 0, 1536, multimodal=True),
}
CODES = {
    400: "invalid_argument",
    401: "invalid_iam_token",
    404: "invalid_model",
    429: "rpm_rate_limit_exceeded",
}


def _reply_id() -> str:
    return "as-" + uuid.uuid4().hex[:10]


class QianfanFake(FakeVendor):
    """Baidu Qianfan v2: per-model limits, one multimodal model, float vectors only."""

    base_path: ClassVar[str] = "/v2"
    # No default_dims: the size is the model's, from MODELS.

    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        model = typed_field(body, "model", str, required=True)
        spec = MODELS.get(model.lower())
        if spec is None:
            raise Rejected(404, f"model {model} not found", "model")
        typed_field(body, "user", str)
        wants_base64(body, "encoding_format", ("float",))
        dims = self.dims_override or spec.dims
        value = body.get("input")
        if not isinstance(value, list) or not value:
            raise Rejected(400, "'input' must be a non-empty list", "input")
        if len(value) > spec.max_texts:
            raise Rejected(400, f"'input' has {len(value)} items, at most {spec.max_texts}")
        if spec.multimodal:
            item = value[0]
            if not isinstance(item, dict):
                raise Rejected(400, "input[0] must be an object with 'text' and/or 'image'")
            text, image = item.get("text"), item.get("image")
            given = [v for v in (text, image) if v is not None]
            if not given or not all(isinstance(v, str) and v for v in given):
                raise Rejected(400, "input[0] needs a non-empty 'text' and/or 'image'")
            tokens = count_tokens(text or "") + (image is not None)
            return Job(model, (item_key(text=text, image=image),), dims, tokens)
        texts = string_list(value, "input")
        for i, text in enumerate(texts):
            if not text:
                raise Rejected(400, f"input[{i}] is an empty string")
            if len(text) > spec.max_chars:
                raise Rejected(
                    400, f"input[{i}] has {len(text)} characters, at most {spec.max_chars}"
                )
        used = sum(map(count_tokens, texts))
        return Job(model, tuple(item_key(text=t) for t in texts), dims, used)

    def reply_fields(self, job: Job, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": _reply_id(), "created": int(time.time())}

    def error(self, problem: Rejected, body: object) -> dict[str, Any]:
        return {
            "id": _reply_id(),
            "code": CODES.get(problem.status, "internal_error"),
            "message": problem.message,
            "type": error_type(problem.status),
        }


Fake = QianfanFake
