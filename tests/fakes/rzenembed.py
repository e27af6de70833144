"""The 360 RzenEmbed fake. Follows the RzenEmbed embeddings API document.

Rules enforced: the header `accept: application/json` is required; `model` is exactly
"RzenEmbed"; the content is in `texts` (at most 1), `images` (at most 1) and `video` (2 to
64 frames), at least one of them given, and text with image makes one fused vector;
`input` is the OpenAI SDK's placeholder list; `instruction` and `request_id` are strings;
`dimensions` is one of six sizes (default 2048). The reply is the OpenAI list plus
`message: "success"`, `response_status: 0` and the `request_id` (a new uuid when the
request gave none). Errors are `{"data": [], "message", "response_status", "request_id"}`,
with the HTTP status as `response_status`. Only `response_status` and `message` tell a
failure, whatever the HTTP status: the `error_body` fault plays one with HTTP 200,
`response_status` 1002 and "model invocation failed".
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from aiohttp import web

from .base import FakeVendor, Job, Rejected, count_tokens, item_key, string_list, typed_field

DIMENSIONS = frozenset({256, 512, 768, 1024, 1536, 2048})


def _request_id(body: object) -> str:
    """The request's own `request_id` when it is a string, else a new uuid."""
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else str(uuid.uuid4())


class RzenEmbedFake(FakeVendor):
    """360 RzenEmbed: one multimodal item per request, in its own success envelope."""

    default_dims: ClassVar[int] = 2048

    def parse(self, request: web.Request, body: dict[str, Any]) -> Job:
        typed_field(body, "request_id", str)
        if request.headers.get("accept") != "application/json":
            raise Rejected(400, "header 'accept: application/json' is required")
        if body.get("model") != "RzenEmbed":
            raise Rejected(400, "'model' must be RzenEmbed", "model")
        typed_field(body, "input", list)
        typed_field(body, "instruction", str)
        dims = typed_field(body, "dimensions", int)
        if dims is None:
            dims = self.dims
        elif dims not in DIMENSIONS:
            raise Rejected(400, "'dimensions' must be one of 256, 512, 768, 1024, 1536, 2048")
        texts, images, video = (
            string_list(body.get(n) or [], n) for n in ("texts", "images", "video")
        )
        if len(texts) > 1:
            raise Rejected(400, f"'texts' has {len(texts)} items, at most 1")
        if len(images) > 1:
            raise Rejected(400, f"'images' has {len(images)} items, at most 1")
        if video and not 2 <= len(video) <= 64:
            raise Rejected(400, f"'video' has {len(video)} frames, needs 2 to 64")
        if not (texts or images or video):
            raise Rejected(400, "one of 'texts', 'images' or 'video' is required")
        key = item_key(texts[0] if texts else None, images[0] if images else None, video or None)
        tokens = sum(map(count_tokens, texts)) + len(images) + len(video)
        return Job("RzenEmbed", (key,), dims, tokens)

    def reply_fields(self, job: Job, body: dict[str, Any]) -> dict[str, Any]:
        # An empty request_id is no id: the reply gets a new one (parse checked the type).
        rid = body.get("request_id") or str(uuid.uuid4())
        return {"message": "success", "response_status": 0, "request_id": rid}

    def error(self, problem: Rejected, body: object) -> dict[str, Any]:
        return {
            "data": [],
            "message": problem.message,
            "response_status": problem.status,
            "request_id": _request_id(body),
        }

    def in_band_error(self, body: object) -> dict[str, Any]:
        return {
            "data": [],
            "message": "model invocation failed",
            "response_status": 1002,
            "request_id": _request_id(body),
        }


Fake = RzenEmbedFake
