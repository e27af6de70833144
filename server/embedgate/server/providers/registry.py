"""The composition root of the providers: every dialect is listed here once, and every
other list of them (the provider names, the configuration's model union, the tests'
fakes) is derived from this one.

Configured models become provider instances here. Vendor keys are read here, once, at
start-up: a key that cannot be read stops the server with a message naming the variable
or file (never the key).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from embedgate.server import config
from embedgate.server.config import (
    DEFAULT_MODEL_NAME,
    Config,
    ConfigError,
    DeployedModelSettings,
    ModelSettings,
)
from embedgate.server.health import Health
from embedgate.server.metrics import Metrics
from embedgate.server.providers.aggregator import Aggregator
from embedgate.server.providers.base import Provider
from embedgate.server.providers.ctyun import CTyun
from embedgate.server.providers.dialect import Dialect, Reranking
from embedgate.server.providers.http import HttpDriver
from embedgate.server.providers.local import LocalProvider, LocalSettings
from embedgate.server.providers.openai_compatible import OpenAICompatible
from embedgate.server.providers.qianfan import Qianfan
from embedgate.server.providers.rzenembed import RzenEmbed
from embedgate.server.providers.scnet import SCNet
from embedgate.server.providers.settings import SettingError, VendorSettings
from embedgate.server.providers.vendor import (
    RerankingVendorProvider,
    VendorProvider,
    VendorQuota,
)
from embedgate.server.quotas import Limits, LocalStore, Quota, Rate, Store

# Every vendor dialect, once. Adding a vendor: its module, and one entry here.
DIALECTS: dict[str, type[Dialect]] = {
    dialect.vendor: dialect
    for dialect in (RzenEmbed, CTyun, SCNet, Qianfan, Aggregator, OpenAICompatible)
}
# What a model entry's ``provider`` may be: the local model, then each vendor.
PROVIDERS: tuple[str, ...] = ("local", *DIALECTS)
# The settings class of each vendor: what a deployment may be.
VENDOR_SETTINGS: tuple[type[VendorSettings], ...] = tuple(
    dialect.settings_type for dialect in DIALECTS.values()
)
# Every kind of model entry, as the configuration's model union: the local model, each
# vendor's, and a model served by several deployments of the vendors'.
MODEL_SETTINGS: tuple[type[ModelSettings], ...] = (
    LocalSettings,
    *VENDOR_SETTINGS,
    config.deployed_settings(VENDOR_SETTINGS),
)

# A loaded file: each entry of ``models`` is one of ``MODEL_SETTINGS``.
GatewayConfig: TypeAlias = Config[ModelSettings]


def parse_config(raw: Any, source: str = "config") -> GatewayConfig:
    """Validate a parsed configuration file against every provider's settings."""
    return config.parse_config(raw, MODEL_SETTINGS, source)


def default_config() -> GatewayConfig:
    """No file: the embedded default model, under its well-known name."""
    return parse_config({"models": [{"name": DEFAULT_MODEL_NAME, "provider": "local"}]})


def load_config(path: str | Path | None) -> GatewayConfig:
    """Read and validate ``path``, or return the default when ``path`` is None."""
    if path is None:
        return default_config()
    return parse_config(config.read_config_file(path), str(path))


# Makes a model with deployments its provider, from its settings and its deployments'
# own providers (routing's business: the composition module supplies it).
Compose = Callable[
    [DeployedModelSettings[Any], Sequence[tuple[VendorSettings, Provider]], Health, Metrics],
    Provider,
]


def build_providers(
    models: Sequence[ModelSettings],
    *,
    driver: HttpDriver | None = None,
    source: str = "config",
    metrics: Metrics | None = None,
    health: Health | None = None,
    compose: Compose | None = None,
    quotas: Store | None = None,
) -> list[Provider]:
    """One provider per configured model; vendor models share one HTTP driver, and
    report their calls to ``health``. A model with deployments is made by ``compose``
    from one provider per deployment, each making one attempt per request. Vendor
    quotas are counted in ``quotas`` (default: this process's memory)."""
    shared = driver or HttpDriver()
    metrics = metrics or Metrics()
    health = health or Health()
    providers: list[Provider] = []
    for position, model in enumerate(models):
        try:
            if isinstance(model, DeployedModelSettings):
                if compose is None:
                    raise SettingError("deployments", "this gateway serves no deployments")
                members = build_deployments(model, shared, metrics, quotas)
                providers.append(compose(model, members, health, metrics))
                continue
            providers.append(build_provider(model, shared, metrics, health, quotas))
        except SettingError as problem:
            raise ConfigError(f"{source}: models[{position}].{problem.field}: {problem}") from None
    return providers


def build_deployments(
    model: DeployedModelSettings[Any],
    driver: HttpDriver,
    metrics: Metrics,
    quotas: Store | None = None,
) -> list[tuple[VendorSettings, Provider]]:
    """One provider per deployment, with its own retries off and no waiting for its
    quota: the model's retries, and its waits, go to another deployment when there is
    one."""
    members: list[tuple[VendorSettings, Provider]] = []
    for position, deployment in enumerate(model.deployments):
        assert isinstance(deployment, VendorSettings)  # the union holds vendors only
        once = deployment.model_copy(update={"max_retries": 0})
        try:
            quota = build_quota(deployment, f"{model.name}/{deployment.name}", quotas)
            provider = build_vendor_provider(
                once, driver, metrics, quota=quota, model_name=model.name, waits_for_quota=False
            )
            members.append((deployment, provider))
        except SettingError as problem:
            raise SettingError(f"deployments[{position}].{problem.field}", str(problem)) from None
    return members


def build_provider(
    model: ModelSettings,
    driver: HttpDriver,
    metrics: Metrics,
    health: Health,
    quotas: Store | None = None,
) -> Provider:
    if isinstance(model, LocalSettings):
        return LocalProvider(model, metrics)
    if isinstance(model, VendorSettings):
        quota = build_quota(model, model.name, quotas)
        return build_vendor_provider(model, driver, metrics, health, quota=quota)
    raise TypeError(f"no provider is registered for {type(model).__name__}")


def build_vendor_provider(
    model: VendorSettings,
    driver: HttpDriver,
    metrics: Metrics | None = None,
    health: Health | None = None,
    *,
    quota: Quota | None = None,
    model_name: str | None = None,
    waits_for_quota: bool = True,
) -> VendorProvider:
    """``quota``: the vendor quotas it takes from before each attempt; it waits for
    room within the caller's deadline, unless ``waits_for_quota`` is off (a deployment:
    its model sends the request elsewhere). ``model_name``: the model a deployment
    belongs to."""
    dialect = DIALECTS[model.provider](model)
    base_url = model.base_url or dialect.default_base_url
    if base_url is None:  # config validation requires one where there is no default
        raise SettingError("base_url", f"is required for {dialect.title}")
    keys = read_keys(model)
    own = (health or Health()).model(model.name)
    quotas = VendorQuota(quota, model_name or model.name, waits=waits_for_quota)
    if isinstance(dialect, Reranking) and dialect.capabilities.reranks:
        return RerankingVendorProvider(
            dialect, driver, metrics, base_url=base_url, keys=keys, health=own, quota=quotas
        )
    return VendorProvider(
        dialect, driver, metrics, base_url=base_url, keys=keys, health=own, quota=quotas
    )


def read_keys(model: VendorSettings) -> list[str]:
    """The vendor keys, from the environment or files (mounted Kubernetes secrets): one,
    a pool, or none."""
    pool = model.key_sources()
    if pool:
        keys = [
            from_env(where, field) if model.api_key_envs else from_file(where, field)
            for field, where, _ in pool
        ]
    else:
        key = read_secret(model.api_key_env, model.api_key_file, prefix="api_key")
        keys = [key] if key is not None else []
    for position, key in enumerate(keys):
        if key in keys[:position]:
            field = "api_key_envs" if model.api_key_envs else "api_key_files"
            raise SettingError(
                f"{field}[{position}]", f"the same key as {field}[{keys.index(key)}]"
            )
    return keys


def quota_limits(model: VendorSettings) -> tuple[Limits, list[Limits]] | None:
    """A deployment's (or a model's one endpoint's) own limits and each key's; None
    when it has none."""
    own = Limits(_rate(model.rate_limit), _rate(model.token_limit))
    keys = [
        Limits(_rate(limits.rate_limit), _rate(limits.token_limit))
        for _, _, limits in model.key_sources()
    ]
    return (own, keys) if own or any(keys) else None


def build_quota(model: VendorSettings, scope: str, store: Store | None) -> Quota | None:
    """The vendor quotas of one deployment (or of a model's one endpoint), None when it
    has none."""
    limits = quota_limits(model)
    if limits is None:
        return None
    own, keys = limits
    return Quota(scope, own, keys, store=store or LocalStore())


def _rate(text: str | None) -> Rate | None:
    return Rate.parse(text) if text is not None else None


def read_secret(env: str | None, file: str | None, *, prefix: str) -> str | None:
    """A secret (a vendor key, a caller's token) from environment variable ``env`` or
    from ``file``, read once at start-up; None when neither is given. A problem raises
    ``SettingError`` on ``<prefix>_env`` or ``<prefix>_file``, naming the variable or
    the file, never the secret."""
    if env:
        return from_env(env, f"{prefix}_env")
    if file:
        return from_file(file, f"{prefix}_file")
    return None


def from_env(env: str, field: str) -> str:
    """A secret from environment variable ``env`` (``field`` names the setting)."""
    secret = os.environ.get(env, "").strip()
    if not secret:
        raise SettingError(field, f"environment variable {env} is not set or empty")
    return secret


def from_file(file: str, field: str) -> str:
    """A secret from ``file`` (``field`` names the setting)."""
    path = Path(file)
    try:
        # Secret files often end with a newline; the secret never does.
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise SettingError(field, f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise SettingError(field, f"{path} is not UTF-8 text") from None
    if not secret:
        raise SettingError(field, f"{path} is empty")
    return secret
