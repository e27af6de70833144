"""Loopback fakes of the embedding vendors' HTTP dialects, for the gateway's tests.

Each fake is a real aiohttp server on 127.0.0.1 that speaks one vendor's dialect the way
its document describes it (base.py has what they share). The fake of a vendor is the
`Fake` of the module named as the gateway names the vendor: `FAKES` is derived from the
gateway's own registry, so a vendor added there without a fake here is noticed
(tests/test_fake_vendors.py), and the vendor world serves every vendor there is.
"""

from __future__ import annotations

import importlib

# The only import of the gateway's registry: the vendor names are its keys.
from embedgate.server.providers.registry import DIALECTS as _REGISTERED

from .base import (
    DEFAULT_KEY,
    FakeVendor,
    Fault,
    Received,
    Rejected,
    count_tokens,
    fake_vector,
    item_key,
    rerank_score,
)

__all__ = [
    "FAKES",
    "MISSING_FAKES",
    "VENDORS",
    "FakeVendor",
    "Fault",
    "Received",
    "Rejected",
    "count_tokens",
    "fake_vector",
    "item_key",
    "make_fake",
    "rerank_score",
]

# The vendors the gateway registers, in its order.
VENDORS: tuple[str, ...] = tuple(_REGISTERED)


def _load(vendor: str) -> type[FakeVendor] | None:
    """The `Fake` of module `fakes.<vendor>`; None when there is no such module."""
    name = f"{__name__}.{vendor}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as missing:
        if missing.name != name:
            raise  # the fake is there, but something it imports is not
        return None
    fake: type[FakeVendor] = module.Fake
    return fake


_LOADED = {vendor: _load(vendor) for vendor in VENDORS}
FAKES: dict[str, type[FakeVendor]] = {v: fake for v, fake in _LOADED.items() if fake is not None}
# Registered vendors with no fake: a missing one fails its own test, not every import.
MISSING_FAKES: tuple[str, ...] = tuple(v for v, fake in _LOADED.items() if fake is None)


def make_fake(
    vendor: str,
    *,
    api_key: str | None = DEFAULT_KEY,
    dims: int | None = None,
    max_batch: int | None = None,
) -> FakeVendor:
    """A fake of `vendor`, not yet started (`async with` it, or `start()` and `close()`).

    `api_key` is the Bearer key it accepts (None: any caller); `dims` its vector size
    instead of the vendor's default; `max_batch` a cap on items per request.
    """
    try:
        fake = FAKES[vendor]
    except KeyError:
        raise ValueError(f"no fake for vendor {vendor!r}") from None
    return fake(api_key=api_key, dims=dims, max_batch=max_batch)
