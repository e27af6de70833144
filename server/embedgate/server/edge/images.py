"""Recognising image bytes by their signature, without decoding them."""

from __future__ import annotations

# (media type, test on the first bytes). Formats the vendors document accepting.
_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("image/png", (b"\x89PNG\r\n\x1a\n",)),
    ("image/jpeg", (b"\xff\xd8\xff",)),
    ("image/gif", (b"GIF87a", b"GIF89a")),
    ("image/bmp", (b"BM",)),
    ("image/tiff", (b"II*\x00", b"MM\x00*")),
)

KNOWN_FORMATS = "PNG, JPEG, GIF, WebP, BMP or TIFF"

# Names callers use for the same type.
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-ms-bmp": "image/bmp"}


def sniff_image(data: bytes) -> str | None:
    """The media type ``data`` starts like, or None if it is no image we know."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for media_type, prefixes in _SIGNATURES:
        if any(data.startswith(prefix) for prefix in prefixes):
            # "BM" alone is two bytes; a real BMP header is at least 26.
            if media_type == "image/bmp" and len(data) < 26:
                return None
            return media_type
    return None


def canonical_media_type(value: str) -> str:
    value = value.strip().lower().split(";", 1)[0].strip()
    return _ALIASES.get(value, value)
