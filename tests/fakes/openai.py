"""The OpenAI-compatible fake. Follows the OpenAI embeddings API reference, the shape every
OpenAI-compatible server (OpenAI, vLLM, TEI, Ollama...) copies.

Rules enforced: `model` is required; `user` is a string; `input` is a string or a non-empty
list of strings, none empty; `dimensions` is from 1 to the native size (1536 unless the
test gives one); `encoding_format` is float or base64. Errors are
`{"error": {"message", "type", "param", "code"}}`, `param` naming the refused field.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web

from .base import (
    FakeVendor,
    Job,
    Rejected,
    count_tokens,
    item_key,
    openai_error,
    text_inputs,
    typed_field,
    wants_base64,
)


class OpenAIFake(FakeVendor):
    """OpenAI-compatible `/v1/embeddings`: text only, any size up to the native one."""

    default_dims: ClassVar[int] = 1536

    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        model = typed_field(body, "model", str, required=True)
        typed_field(body, "user", str)
        texts = text_inputs(body)
        for i, text in enumerate(texts):
            if not text:
                raise Rejected(400, f"input[{i}] is an empty string", "input")
        dims = typed_field(body, "dimensions", int)
        if dims is None:
            dims = self.dims
        elif not 1 <= dims <= self.dims:
            raise Rejected(400, f"'dimensions' must be between 1 and {self.dims}", "dimensions")
        b64 = wants_base64(body, "encoding_format", ("float", "base64"))
        used = sum(map(count_tokens, texts))
        return Job(model, tuple(item_key(text=t) for t in texts), dims, used, base64=b64)

    def error(self, problem: Rejected, body: object) -> dict[str, Any]:
        return {"error": openai_error(problem) | {"param": problem.param}}


Fake = OpenAIFake
