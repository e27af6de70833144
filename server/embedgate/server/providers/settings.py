"""The settings every vendor-served model has; each vendor module subclasses them with
its own keys, next to its dialect.

Validated once, when the file is loaded: a dialect reads typed values and checks only
what depends on its vendor's document (a size it must know, a documented batch limit),
raising ``SettingError`` on the key at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from embedgate.server.config import EnvName, HttpUrl, ModelSettings, RateText, Strict
from embedgate.server.domain import Modality

# How a configuration names the kinds of input a model takes.
ModalityName = Literal["text", "image", "video", "text_image"]


class SettingError(ValueError):
    """A model's settings cannot work with its vendor; ``field`` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class KeyLimits(Strict):
    """A key's own vendor quotas, for a key of a pool the vendor limits per key."""

    rate_limit: RateText | None = None
    token_limit: RateText | None = None


class KeyEnv(KeyLimits):
    env: EnvName


class KeyFile(KeyLimits):
    file: str = Field(min_length=1)


class VendorSettings(ModelSettings):
    """What every vendor-served model has (see docs/configuration.md)."""

    # OpenAI-SDK style: the dialect appends /embeddings or /rerank.
    base_url: HttpUrl | None = None
    vendor_model: str = Field(min_length=1, max_length=256)
    # Where the key is read from, once, at start-up.
    api_key_env: EnvName | None = None
    api_key_file: str | None = Field(default=None, min_length=1)
    # A pool of keys, used in turn: a refused one leaves the pool, one told to wait
    # (429) sits out while the others carry on.
    # A key given with its own rate_limit / token_limit ({env: NAME, rate_limit: ...})
    # is limited on its own besides the deployment's limits.
    api_key_envs: list[EnvName | KeyEnv] | None = Field(default=None, min_length=1, max_length=64)
    api_key_files: list[str | KeyFile] | None = Field(default=None, min_length=1, max_length=64)
    # Inputs per vendor request (at most what the vendor documents) and per RPC.
    max_batch: int | None = Field(default=None, ge=1, le=4096)
    max_inputs: int = Field(default=256, ge=1, le=4096)
    # Vendor requests in flight at once for this model.
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    coalesce_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    # One vendor attempt's limit; retries of 408/429/5xx/connection errors with backoff.
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)
    retry_backoff_max_s: float = Field(default=8.0, ge=0, le=600)
    # The size of the vectors when a call asks for none (required where unknown).
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    # The model is Matryoshka-trained: other sizes are served by a local cut.
    matryoshka: bool = False
    # Unit vectors unless a call says otherwise.
    normalize: bool = True
    # Characters per text, checked before anything else: above an 8,192-token text in
    # any language. The vendor's own (smaller) documented limits apply after it.
    max_text_chars: int = Field(default=65536, ge=1, le=10_000_000)
    # Vendor quotas: requests and tokens per second, minute, hour or day (600/minute).
    # Tokens are estimated before sending and settled with the vendor's count.
    rate_limit: RateText | None = None
    token_limit: RateText | None = None
    # What the vendor charges per million tokens: gives each caller's cost
    # (embedgate_caller_cost), in whatever currency it is written in.
    price_per_million_tokens: float | None = Field(default=None, ge=0, le=1_000_000)
    # As one of a model's deployments: its share of traffic among the usable ones of
    # its priority, and its tier (1 is used only when every 0 is out of service).
    weight: int = Field(default=1, ge=1, le=1000)
    priority: int = Field(default=0, ge=0, le=9)

    def key_sources(self) -> list[tuple[str, str, KeyLimits]]:
        """A pool's keys as (setting, environment variable or file, own limits)."""
        if self.api_key_envs:
            return [
                (f"api_key_envs[{i}]", *_key(entry)) for i, entry in enumerate(self.api_key_envs)
            ]
        if self.api_key_files:
            return [
                (f"api_key_files[{i}]", *_key(entry)) for i, entry in enumerate(self.api_key_files)
            ]
        return []

    # Vendors whose documents say every request carries a key.
    key_required: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        sources = [
            name
            for name in ("api_key_env", "api_key_file", "api_key_envs", "api_key_files")
            if getattr(self, name)
        ]
        if len(sources) > 1:
            raise ValueError(f"give one of {', '.join(sources)}, not several")
        if self.key_required and not sources:
            raise ValueError(
                f"api_key_env or api_key_file is required: {self.provider} "
                "authenticates every request with a key (api_key_envs or api_key_files "
                "for a pool of keys)"
            )
        return self


def _key(entry: str | KeyEnv | KeyFile) -> tuple[str, KeyLimits]:
    if isinstance(entry, str):
        return entry, KeyLimits()
    where = entry.env if isinstance(entry, KeyEnv) else entry.file
    return where, KeyLimits(rate_limit=entry.rate_limit, token_limit=entry.token_limit)


def modality_set(names: Sequence[str] | None) -> frozenset[Modality] | None:
    """Configured modality names as domain values (None: not configured)."""
    return frozenset(Modality(name) for name in names) if names else None
