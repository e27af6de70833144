"""The CTyun Wishub fake. Follows the CTyun Wishub embeddings API document.

Rules enforced: `model` (a model ID) is required; `input` is a string, a list of strings or
token arrays (one array, or a list of non-empty arrays of integers), at most 8192 tokens
each; `user` is a string; `dimensions` is taken only by text-embedding-3-class models, from
1 to the native size; `encoding_format` is float or base64. The vector is under
`embeddings`, as the document's reply table and sample code name it (OpenAI says
`embedding`). Errors are `{"error": {"code": "<status>001", "type": "INVOKE_MODEL_ERROR",
"message"}}`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web

from .base import (
    MAX_TOKENS,
    FakeVendor,
    Job,
    Rejected,
    check_tokens,
    is_int,
    item_key,
    text_inputs,
    typed_field,
    wants_base64,
)


class CTyunFake(FakeVendor):
    """CTyun Wishub: OpenAI-style text embeddings, the vector under `embeddings`."""

    default_dims: ClassVar[int] = 1024
    vector_field: ClassVar[str] = "embeddings"

    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        model = typed_field(body, "model", str, required=True)
        typed_field(body, "user", str)
        value = body.get("input")
        if isinstance(value, list) and value and all(is_int(t) for t in value):
            value = [value]  # one token array
        if isinstance(value, list) and value and all(isinstance(t, list) for t in value):
            if not all(t and all(is_int(x) for x in t) for t in value):
                raise Rejected(400, "'input' token arrays must be non-empty lists of integers")
            # A token array is embedded as the text of its numbers, so a test can name it.
            texts = [" ".join(map(str, tokens)) for tokens in value]
            for i, tokens in enumerate(value):
                if len(tokens) > MAX_TOKENS:
                    raise Rejected(400, f"input[{i}] has {len(tokens)} tokens, more than 8192")
            used = sum(len(t) for t in value)
        else:
            texts = text_inputs(body)
            used = check_tokens(texts)
        dims = typed_field(body, "dimensions", int)
        if dims is None:
            dims = self.dims
        elif not model.startswith("text-embedding-3"):
            raise Rejected(400, "'dimensions' is only supported by text-embedding-3 models")
        elif not 1 <= dims <= self.dims:
            raise Rejected(400, f"'dimensions' must be between 1 and {self.dims}")
        b64 = wants_base64(body, "encoding_format", ("float", "base64"))
        return Job(model, tuple(item_key(text=t) for t in texts), dims, used, base64=b64)

    def error(self, problem: Rejected, body: object) -> dict[str, Any]:
        return {
            "error": {
                "code": f"{problem.status}001",
                "type": "INVOKE_MODEL_ERROR",
                "message": problem.message,
            }
        }


Fake = CTyunFake
