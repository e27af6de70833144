"""The SCNet fake. Follows the SCNet embeddings API document.

Rules enforced: the API lives under `/api/llm/v1`; `model` is required; `input` is a string
or a list of at most 5 strings, at most 8192 tokens each; the size (4096 for
Qwen3-Embedding-8B) "cannot be changed", so `dimension` or `dimensions`, given as an
integer or a string of digits (the curl sample sends "4096"), must equal it;
`encoding_format` is float or base64. The reply adds `id` ("embd-..."), `created`, and the
`usage` fields of the document's sample (completion tokens 0, the others null). Errors are
OpenAI-shaped without `param`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from aiohttp import web

from .base import (
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


class SCNetFake(FakeVendor):
    """SCNet: OpenAI-style text embeddings, at most 5 texts, a fixed size."""

    base_path: ClassVar[str] = "/api/llm/v1"
    default_dims: ClassVar[int] = 4096

    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        model = typed_field(body, "model", str, required=True)
        texts = text_inputs(body, max_items=5)
        used = check_tokens(texts)
        # The document names the size field both ways; either, if given, must not change it.
        for name in ("dimension", "dimensions"):
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if not is_int(value):
                raise Rejected(400, f"'{name}' must be an integer")
            if value != self.dims:
                raise Rejected(400, f"'{name}' is {self.dims} for {model} and cannot be changed")
        b64 = wants_base64(body, "encoding_format", ("float", "base64"))
        return Job(model, tuple(item_key(text=t) for t in texts), self.dims, used, base64=b64)

    def usage_fields(self) -> dict[str, Any]:
        return {
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
            "prompt_cache_hit_tokens": None,
            "prompt_cache_miss_tokens": None,
        }

    def reply_fields(self, job: Job, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": "embd-" + uuid.uuid4().hex, "created": int(time.time())}


Fake = SCNetFake
