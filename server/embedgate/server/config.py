"""The YAML configuration, validated at start-up.

A bad file fails start-up with a message naming the bad key (``models[1].provider``).
This module holds the file's frame (server, cache, the shape of a model entry); each
provider's own keys live in its module, gathered by ``providers/registry.py``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, Self, TypeVar, Union, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

MIB = 1024 * 1024
# The embedded local model's well-known name: what serves when there is no file.
DEFAULT_MODEL_NAME = "all-minilm-l6-v2"

# A 64-frame video of 1 MiB frames is 64 MiB of image bytes plus a few bytes of
# framing per frame: 72 MiB leaves room for that and the rest of the request.
DEFAULT_MAX_REQUEST_BYTES = 72 * MIB
# 512 vectors of 4096 float32 values are 8 MiB plus about 12 bytes of framing each:
# 16 MiB holds them with room to spare.
DEFAULT_MAX_RESPONSE_BYTES = 16 * MIB

# A quota: N units per second, minute, hour or day (``600/minute``).
RATE_PATTERN = r"^\s*([1-9][0-9]{0,11})\s*/\s*(second|minute|hour|day)\s*$"


def _rate(text: str) -> str:
    if re.match(RATE_PATTERN, text) is None:
        raise ValueError(f"{text!r} is not a rate: write N/second, N/minute, N/hour or N/day")
    return text


RateText = Annotated[str, AfterValidator(_rate)]

ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.:/-]*$")]


class Strict(BaseModel):
    """Settings: unknown keys are errors, values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(Strict):
    """TLS for the main listener; with ``client_ca_file``, mutual TLS."""

    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    # Given: every caller must present a certificate this CA signed.
    client_ca_file: str | None = Field(default=None, min_length=1)


CallerName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]


class CallerLimits(Strict):
    """What one caller may use, each per second, minute, hour or day (``100/second``),
    counted across every replica that shares the quotas' Redis."""

    # Calls that embed or rerank: Embed, StreamEmbed, Rerank, each EmbedPipeline request.
    rate_limit: RateText | None = None
    # Their inputs (a rerank's documents and query), cache hits included.
    input_limit: RateText | None = None
    # Tokens embedded for them (a cache hit costs none).
    token_limit: RateText | None = None

    @property
    def limited(self) -> bool:
        return any((self.rate_limit, self.input_limit, self.token_limit))


class TokenConfig(CallerLimits):
    """One bearer token callers may present (``authorization: Bearer <token>``); its
    name is the caller's, in logs and metrics, and its limits the caller's."""

    # Named in logs and metrics in place of the token, which never is.
    name: CallerName
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    token_file: str | None = Field(default=None, min_length=1)
    # The models this token may use; none: every model.
    models: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if bool(self.token_env) == bool(self.token_file):
            raise ValueError("give token_env or token_file (one of them)")
        return self


class AuthConfig(Strict):
    """Callers must present one of these tokens (health checks excepted)."""

    tokens: list[TokenConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [token.name for token in self.tokens]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"token names must be unique: {', '.join(repeated)}")
        return self


class ServerConfig(Strict):
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
    # The HTTP doors (the OpenAI embeddings API...) on this port: HTTP/1.1 and h2c, behind
    # the same TLS, tokens, cap, access lines and deadlines as gRPC; none: not served.
    http_port: int | None = Field(default=None, ge=0, le=65535)
    http_host: str | None = None  # default: host
    # Origins a browser may call the HTTP doors from (CORS); none by default.
    cors_origins: list[str] = Field(default_factory=list)


class CallerConfig(CallerLimits):
    """A caller known by the name it gives (``callers.header``) when auth is off."""

    name: CallerName


# Where a caller gives its name when the server has no auth, unless configured.
CALLER_HEADER = "x-embedgate-caller"


class CallersConfig(Strict):
    """Who each call is for. With ``server.auth``, its token's name; without, the name
    it gives in ``header`` (gRPC metadata, or an HTTP header), else ``anonymous``."""

    header: str = Field(default=CALLER_HEADER, pattern=r"^[a-z0-9][a-z0-9-]*$")
    # The callers known by name, each with its limits, if any: the names the metrics'
    # caller label shows (any other given name is counted as "(other)").
    names: list[CallerConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [caller.name for caller in self.names]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"caller names must be unique: {', '.join(repeated)}")
        return self


HttpUrl = Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")]
EnvName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class ModelSettings(Strict):
    """What every configured model has. Each provider subclasses it with its own keys
    and a ``provider`` tag of its own (``Literal["scnet"]``); the composition root
    (``providers/registry.py``) makes the union of them that ``models`` holds."""

    name: ModelName
    provider: str
    # How long a batch waits for concurrent calls to join it (0: never merge).
    coalesce_wait_ms: float = Field(default=0.0, ge=0, le=1000)


RedisUrl = Annotated[str, Field(pattern=r"^(redis|rediss|unix)://\S+$")]


class CacheConfig(Strict):
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


class QuotasConfig(Strict):
    """Where the deployments' vendor quotas are counted: a Redis shared by every replica
    (so that together they stay within each limit), else each replica's memory."""

    # Default: the cache's Redis, when it has one.
    redis_url: RedisUrl | None = None
    # While Redis cannot be reached, each replica allows itself this share of each limit.
    local_share: float = Field(default=1.0, gt=0, le=1)
    # How long a quota's Redis command may take before the replica limits on its own.
    redis_timeout_s: float = Field(default=0.1, gt=0, le=10)


class TracingConfig(Strict):
    """OpenTelemetry traces, exported over OTLP (see ``tracing.py``). Every key is
    optional; the standard OTEL_ variables apply where one is not given."""

    # None: on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set.
    enabled: bool | None = None
    # The collector: http(s)://host:port (default: the OTEL_ variables, else the SDK's).
    endpoint: HttpUrl | None = None
    protocol: Literal["grpc", "http/protobuf"] | None = None
    service_name: str | None = Field(default=None, min_length=1, max_length=256)
    # The share of traces kept, following the caller's choice when it made one.
    sample_ratio: float | None = Field(default=None, ge=0, le=1)


M = TypeVar("M", bound=ModelSettings)
V = TypeVar("V", bound=ModelSettings)
# The tag of a model entry that has ``deployments`` (it names no provider of its own).
DEPLOYED = "deployed"


class BreakerSettings(Strict):
    """Each deployment's breaker: ``failures`` vendor-side failures in a row (confirmed
    by the failure rate) take it out of service for ``open_s``, then one probe."""

    failures: int = Field(default=5, ge=1, le=1000)
    open_s: float = Field(default=10.0, gt=0, le=3600)


class DeployedModelSettings(ModelSettings, Generic[V]):
    """A model served by several deployments of one vector space: callers name the
    model; each vendor request goes to one of its deployments, never anywhere else.
    ``V`` is the union of the vendors' settings, each deployment being one of them."""

    provider: Literal["deployed"] = "deployed"
    # A label of the vector space every deployment gives, shown by ListModels.
    space: str | None = Field(default=None, min_length=1, max_length=256)
    # Verify at start-up that every deployment gives the same vectors for a few probe
    # inputs: each probe's cosine with the first deployment's at least this much.
    space_check: bool = False
    space_check_min_cosine: float = Field(default=0.99, gt=0, le=1)
    breaker: BreakerSettings = BreakerSettings()
    coalesce_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    deployments: list[V] = Field(min_length=1, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _no_provider(cls, data: Any) -> Any:
        if isinstance(data, dict) and "provider" in data:
            raise ValueError(
                "a model with deployments names no provider: each deployment names its own"
            )
        return data

    @model_validator(mode="after")
    def _deployments_are_distinct(self) -> Self:
        names = [deployment.name for deployment in self.deployments]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"deployment names must be unique: {', '.join(repeated)}")
        for position, deployment in enumerate(self.deployments):
            if "coalesce_wait_ms" in deployment.model_fields_set:
                raise ValueError(
                    f"deployments[{position}].coalesce_wait_ms: batching belongs to the "
                    "model: set coalesce_wait_ms beside deployments"
                )
        return self


class Config(Strict, Generic[M]):
    """The whole file. ``M`` is the union of every provider's settings, which only the
    composition root knows: this module imports no provider."""

    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    quotas: QuotasConfig = QuotasConfig()
    callers: CallersConfig = CallersConfig()
    tracing: TracingConfig = TracingConfig()
    models: list[M] = Field(min_length=1)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


def _tag(value: Any) -> str | None:
    """Which settings class a model entry is: a dict with ``deployments`` is a deployed
    model, any other names its ``provider``."""
    if isinstance(value, dict):
        return DEPLOYED if "deployments" in value else value.get("provider")
    return getattr(value, "provider", None)


def tagged_union(classes: tuple[type[ModelSettings], ...]) -> Any:
    """The union of ``classes``, each chosen by its ``provider`` tag. Built at run time
    from a tuple: no static type checker can follow it, hence ``Any``."""
    tagged = tuple(Annotated[cls, Tag(provider_tag(cls))] for cls in classes)
    return Annotated[Union[tagged], Discriminator(_tag)]  # noqa: UP007


def deployed_settings(vendors: tuple[type[ModelSettings], ...]) -> type[ModelSettings]:
    """The settings of a model whose deployments are each one of ``vendors``."""
    generic: Any = DeployedModelSettings
    made: type[ModelSettings] = generic[tagged_union(vendors)]
    return made


@functools.cache
def config_schema(providers: tuple[type[ModelSettings], ...]) -> type[Config[Any]]:
    """The file's schema when ``providers`` are the settings classes of the providers
    there are (one each, told apart by their ``provider`` tag)."""
    generic: Any = Config
    schema: type[Config[Any]] = generic[tagged_union(providers)]
    return schema


def provider_tag(settings: type[ModelSettings]) -> str:
    """The ``provider`` value that selects ``settings`` (its one-value Literal)."""
    (tag,) = get_args(settings.model_fields["provider"].annotation)
    return str(tag)


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
        if isinstance(node, dict) and part not in node and _tag(node) == part:
            continue
        out += f".{part}" if out else part
        node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def parse_config(
    raw: Any, providers: tuple[type[ModelSettings], ...], source: str = "config"
) -> Config[Any]:
    """Validate the file's contents ``raw`` (parsed YAML) against ``providers``' settings;
    a problem raises ``ConfigError`` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' key")
    try:
        config = config_schema(providers).model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = _key_path(tuple(error["loc"]), raw)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                expected = str((error.get("ctx") or {}).get("expected_tags", ""))
                known = [t.strip(" '") for t in expected.split(",") if t.strip(" '")] or [
                    provider_tag(cls) for cls in providers
                ]
                known = [tag for tag in known if tag != DEPLOYED]
                given = error["input"].get("provider") if isinstance(error["input"], dict) else None
                where += ".provider"
                message = (
                    f"unknown provider {given!r} (known: {', '.join(known)})"
                    if given is not None
                    else f"is required: one of {', '.join(known)} (or a list of deployments)"
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
    if config.server.auth is not None and config.callers.names:
        raise ConfigError(
            f"{source}: callers.names: with server.auth, each caller is its token: give "
            "the limits on server.auth.tokens[...] instead"
        )
    if config.server.auth is not None:
        for position, token in enumerate(config.server.auth.tokens):
            unknown = sorted(set(token.models or ()) - set(first_use))
            if unknown:
                raise ConfigError(
                    f"{source}: server.auth.tokens[{position}].models: no model named "
                    f"{', '.join(map(repr, unknown))} is configured"
                )
    return config


def read_config_file(path: str | Path) -> Any:
    """The YAML file at ``path``, parsed but not yet validated."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
