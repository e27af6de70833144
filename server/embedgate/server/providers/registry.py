"""Configured models → provider instances. Heavy providers are imported only when used.

Vendor keys are read here, once, at start-up: a key that cannot be read stops the
server with a message naming the variable or file (never the key).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from embedgate.server.config import (
    ConfigError,
    LocalModelConfig,
    ModelConfig,
    VendorModelConfig,
)
from embedgate.server.domain import Modality
from embedgate.server.metrics import Metrics
from embedgate.server.providers.aggregator import Aggregator
from embedgate.server.providers.base import Provider
from embedgate.server.providers.ctyun import CTyun
from embedgate.server.providers.dialect import Dialect, SettingError, VendorModel
from embedgate.server.providers.http import HttpDriver, RetryPolicy
from embedgate.server.providers.openai_compatible import OpenAICompatible
from embedgate.server.providers.qianfan import Qianfan
from embedgate.server.providers.rzenembed import RzenEmbed
from embedgate.server.providers.scnet import SCNet
from embedgate.server.providers.vendor import VendorProvider, VendorSettings

DIALECTS: dict[str, type[Dialect]] = {
    dialect.vendor: dialect
    for dialect in (RzenEmbed, CTyun, SCNet, Qianfan, Aggregator, OpenAICompatible)
}


def build_providers(
    models: Sequence[ModelConfig],
    *,
    driver: HttpDriver | None = None,
    source: str = "config",
    metrics: Metrics | None = None,
) -> list[Provider]:
    """One provider per configured model; vendor models share one HTTP driver."""
    shared = driver or HttpDriver()
    metrics = metrics or Metrics()
    providers: list[Provider] = []
    for position, model in enumerate(models):
        try:
            providers.append(build_provider(model, shared, metrics))
        except SettingError as problem:
            raise ConfigError(f"{source}: models[{position}].{problem.field}: {problem}") from None
    return providers


def build_provider(model: ModelConfig, driver: HttpDriver, metrics: Metrics) -> Provider:
    if isinstance(model, LocalModelConfig):
        from embedgate.server.providers.local import LocalProvider, LocalSettings

        return LocalProvider(
            LocalSettings(
                name=model.name,
                path=model.path,
                max_inputs=model.max_inputs,
                max_batch=model.max_batch,
                truncate=model.truncate,
                threads=model.threads,
                max_text_chars=model.max_text_chars,
            ),
            metrics,
        )
    return build_vendor_provider(model, driver, metrics)


def build_vendor_provider(
    model: VendorModelConfig,
    driver: HttpDriver,
    metrics: Metrics | None = None,
) -> VendorProvider:
    dialect_class = DIALECTS[model.provider]
    modalities = getattr(model, "modalities", None)
    dialect = dialect_class(
        VendorModel(
            vendor_model=model.vendor_model,
            dimensions=model.dimensions,
            accepts_dimensions=getattr(model, "accepts_dimensions", None),
            matryoshka=model.matryoshka,
            max_batch=model.max_batch,
            encoding_format=getattr(model, "encoding_format", None),
            modalities=frozenset(Modality(m) for m in modalities) if modalities else None,
            instruction=getattr(model, "instruction", None),
            task=getattr(model, "task", "embed"),
        )
    )
    base_url = model.base_url or dialect_class.default_base_url
    if base_url is None:  # config validation requires one where there is no default
        raise SettingError("base_url", f"is required for {dialect_class.title}")
    return VendorProvider(
        VendorSettings(
            name=model.name,
            base_url=base_url,
            api_key=read_key(model),
            max_inputs=model.max_inputs,
            max_concurrency=model.max_concurrency,
            max_text_chars=model.max_text_chars,
            normalize=model.normalize,
            retry=RetryPolicy(
                max_retries=model.max_retries,
                backoff_initial_s=model.retry_backoff_s,
                backoff_max_s=model.retry_backoff_max_s,
                attempt_timeout_s=model.timeout_s,
            ),
        ),
        dialect,
        driver,
        metrics,
    )


def read_key(model: VendorModelConfig) -> str | None:
    """The vendor key from the environment or a file (a mounted Kubernetes secret)."""
    return read_secret(model.api_key_env, model.api_key_file, prefix="api_key")


def read_secret(env: str | None, file: str | None, *, prefix: str) -> str | None:
    """A secret (a vendor key, a caller's token) from environment variable ``env`` or
    from ``file``, read once at start-up; None when neither is given. A problem raises
    ``SettingError`` on ``<prefix>_env`` or ``<prefix>_file``, naming the variable or
    the file, never the secret."""
    if env:
        secret = os.environ.get(env, "").strip()
        if not secret:
            raise SettingError(f"{prefix}_env", f"environment variable {env} is not set or empty")
        return secret
    if file:
        path = Path(file)
        try:
            # Secret files often end with a newline; the secret never does.
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise SettingError(
                f"{prefix}_file", f"cannot read {path}: {error.strerror or error}"
            ) from None
        except UnicodeDecodeError:
            raise SettingError(f"{prefix}_file", f"{path} is not UTF-8 text") from None
        if not secret:
            raise SettingError(f"{prefix}_file", f"{path} is empty")
        return secret
    return None
