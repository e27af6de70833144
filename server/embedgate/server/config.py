"""The YAML configuration, validated at start-up.

A bad file fails start-up with a message naming the bad key (``models[1].provider``).
With no file at all, the server serves the embedded default model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embedgate.server.providers.local import DEFAULT_MODEL_NAME

MIB = 1024 * 1024

# A 64-frame video of 1 MiB frames is 64 MiB of image bytes plus a few bytes of
# framing per frame: 72 MiB leaves room for that and the rest of the request.
DEFAULT_MAX_REQUEST_BYTES = 72 * MIB
# 512 vectors of 4096 float32 values are 8 MiB plus about 12 bytes of framing each:
# 16 MiB holds them with room to spare.
DEFAULT_MAX_RESPONSE_BYTES = 16 * MIB

ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.:/-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    """TLS for the main listener; with ``client_ca_file``, mutual TLS."""

    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    # Given: every caller must present a certificate this CA signed.
    client_ca_file: str | None = Field(default=None, min_length=1)


class TokenConfig(_Strict):
    """One bearer token callers may present (``authorization: Bearer <token>``)."""

    # Named in logs and metrics in place of the token, which never is.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    token_file: str | None = Field(default=None, min_length=1)
    # The models this token may use; none: every model.
    models: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if bool(self.token_env) == bool(self.token_file):
            raise ValueError("give token_env or token_file (one of them)")
        return self


class AuthConfig(_Strict):
    """Callers must present one of these tokens (health checks excepted)."""

    tokens: list[TokenConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [token.name for token in self.tokens]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"token names must be unique: {', '.join(repeated)}")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # Also listen on this Unix domain socket (plaintext: the socket file's permissions
    # guard it), for an app in the same pod.
    uds_path: str | None = Field(default=None, min_length=1)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    # RPCs served at once; beyond it, RESOURCE_EXHAUSTED at once (health is not counted).
    max_concurrent_rpcs: int = Field(default=512, ge=1, le=100_000)
    # Prometheus metrics over HTTP (/metrics) on this port; none: not served.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str | None = None  # default: host
    # A plaintext listener with only grpc.health.v1, for probes when the main one uses TLS.
    health_port: int | None = Field(default=None, ge=0, le=65535)
    # Kubernetes probes come to the pod's address: a sidecar listening on 127.0.0.1
    # serves health on 0.0.0.0. Default: host.
    health_host: str | None = None
    # Vendor calls failing in a row (after retries) before a model is NOT_SERVING.
    unhealthy_after_failures: int = Field(default=3, ge=1, le=1000)
    # Kubernetes waits 30 s by default before SIGKILL; finish in-flight work well before.
    shutdown_grace_s: float = Field(default=20.0, ge=0, le=600)
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=MIB, le=1024 * MIB)
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=MIB, le=1024 * MIB)
    # The deadline of a call that sets none: no vendor call outlives it.
    default_deadline_s: float = Field(default=60.0, gt=0, le=3600)
    # EmbedPipeline: requests one stream may have between being read and their result
    # being taken; the next is read only when one leaves.
    pipeline_max_in_flight: int = Field(default=64, ge=1, le=4096)


class LocalModelConfig(_Strict):
    name: ModelName
    provider: Literal["local"]
    # A sentence-transformers model directory; default: the packaged all-MiniLM-L6-v2.
    path: str | None = None
    max_inputs: int = Field(default=512, ge=1, le=4096)
    max_batch: int = Field(default=32, ge=1, le=1024)
    # Cut texts longer than the model's window instead of rejecting them.
    truncate: bool = False
    threads: int | None = Field(default=None, ge=1, le=256)
    # The model merges calls that arrive while it computes; a wait adds to that.
    coalesce_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    # Characters per text, checked before the tokenizer sees it: tokenizing runs in this
    # process, at about 0.3 ms per 1,000 characters, and a 256-token window holds about
    # 1,200 characters of prose.
    max_text_chars: int = Field(default=8192, ge=1, le=10_000_000)


HttpUrl = Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")]
Modality = Literal["text", "image", "video", "text_image"]


class _VendorModelConfig(_Strict):
    """What every vendor-served model has (see the README's configuration reference)."""

    name: ModelName
    # OpenAI-SDK style: the dialect appends /embeddings or /rerank.
    base_url: HttpUrl | None = None
    vendor_model: str = Field(min_length=1, max_length=256)
    # Where the key is read from, once, at start-up.
    api_key_env: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_key_file: str | None = Field(default=None, min_length=1)
    # Inputs per vendor request (at most what the vendor documents) and per RPC.
    max_batch: int | None = Field(default=None, ge=1, le=4096)
    max_inputs: int = Field(default=256, ge=1, le=4096)
    # Vendor requests in flight at once for this model.
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    # How long a vendor batch waits for concurrent calls to join it (0: never merge).
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

    # Vendors whose documents say every request carries a key.
    key_required: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        if self.key_required and not (self.api_key_env or self.api_key_file):
            raise ValueError(
                f"api_key_env or api_key_file is required: {getattr(self, 'provider', '')} "
                "authenticates every request with a key"
            )
        return self


class RzenEmbedModelConfig(_VendorModelConfig):
    provider: Literal["rzenembed"]
    vendor_model: str = Field(default="RzenEmbed", min_length=1, max_length=256)
    # Sent when a call gives none (the vendor's own default otherwise).
    instruction: str | None = Field(default=None, min_length=1, max_length=4096)
    modalities: list[Modality] | None = Field(default=None, min_length=1)


class CTyunModelConfig(_VendorModelConfig):
    provider: Literal["ctyun"]
    accepts_dimensions: bool | None = None
    encoding_format: Literal["float", "base64"] | None = None


class SCNetModelConfig(_VendorModelConfig):
    provider: Literal["scnet"]
    vendor_model: str = Field(default="Qwen3-Embedding-8B", min_length=1, max_length=256)
    encoding_format: Literal["float", "base64"] | None = None


class QianfanModelConfig(_VendorModelConfig):
    provider: Literal["qianfan"]


class AggregatorModelConfig(_VendorModelConfig):
    provider: Literal["aggregator"]
    base_url: HttpUrl  # the relay has no well-known address
    task: Literal["embed", "rerank"] = "embed"
    modalities: list[Literal["text", "image", "text_image"]] | None = Field(
        default=None, min_length=1
    )
    encoding_format: Literal["float", "base64"] | None = None
    key_required: ClassVar[bool] = False


class OpenAIModelConfig(_VendorModelConfig):
    provider: Literal["openai"]
    accepts_dimensions: bool | None = None
    encoding_format: Literal["float", "base64"] | None = None
    # Self-hosted OpenAI-compatible servers often take no key.
    key_required: ClassVar[bool] = False


VendorModelConfig = (
    RzenEmbedModelConfig
    | CTyunModelConfig
    | SCNetModelConfig
    | QianfanModelConfig
    | AggregatorModelConfig
    | OpenAIModelConfig
)
ModelConfig = Annotated[LocalModelConfig | VendorModelConfig, Field(discriminator="provider")]
PROVIDERS = ("local", "rzenembed", "ctyun", "scnet", "qianfan", "aggregator", "openai")


RedisUrl = Annotated[str, Field(pattern=r"^(redis|rediss|unix)://\S+$")]


class CacheConfig(_Strict):
    """The per-input vector cache: in memory, optionally backed by a shared Redis."""

    enabled: bool = True
    # The in-memory tier's size: vectors and keys together, in bytes.
    max_bytes: int = Field(default=256 * MIB, ge=0, le=64 * 1024 * MIB)
    # How long an entry is served, in either tier.
    ttl_s: float = Field(default=3600.0, gt=0, le=30 * 24 * 3600)
    # A Redis shared by every replica (redis://, rediss:// or unix://); none: memory only.
    redis_url: RedisUrl | None = None
    # How long a Redis command may take before the cache is skipped for that input.
    redis_timeout_s: float = Field(default=0.05, gt=0, le=10)


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    models: list[ModelConfig] = Field(min_length=1)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


def default_config() -> Config:
    """No file: the embedded default model, under its well-known name."""
    return Config(models=[LocalModelConfig(name=DEFAULT_MODEL_NAME, provider="local")])


def _key_path(loc: tuple[int | str, ...], raw: Any) -> str:
    """``('models', 0, 'local', 'max_batch')`` → ``models[0].max_batch``.

    Pydantic puts the tag of a discriminated union into the location; the file has no
    such key, so it is left out.
    """
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and node.get("provider") == part:
            continue
        out += f".{part}" if out else part
        node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def parse_config(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' key")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = _key_path(tuple(error["loc"]), raw)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "union_tag_invalid":
                where += ".provider"
                message = (
                    f"unknown provider {error['input'].get('provider')!r} "
                    f"(known: {', '.join(PROVIDERS)})"
                )
            problems.append(f"{where}: {message}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
    first_use: dict[str, int] = {}
    for position, model in enumerate(config.models):
        if model.name in first_use:
            raise ConfigError(
                f"{source}: models[{position}].name: {model.name!r} is already the name of "
                f"models[{first_use[model.name]}]"
            )
        first_use[model.name] = position
    if config.server.auth is not None:
        for position, token in enumerate(config.server.auth.tokens):
            unknown = sorted(set(token.models or ()) - set(first_use))
            if unknown:
                raise ConfigError(
                    f"{source}: server.auth.tokens[{position}].models: no model named "
                    f"{', '.join(map(repr, unknown))} is configured"
                )
    return config


def load_config(path: str | Path | None) -> Config:
    """Read and validate ``path``, or return the default when ``path`` is None."""
    if path is None:
        return default_config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(raw, str(file))
