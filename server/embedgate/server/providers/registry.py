"""Configured model → provider instance. Heavy providers are imported only when used."""

from __future__ import annotations

from embedgate.server.config import ModelConfig
from embedgate.server.providers.base import Provider


def build_provider(model: ModelConfig) -> Provider:
    if model.provider == "local":
        from embedgate.server.providers.local import LocalProvider, LocalSettings

        return LocalProvider(
            LocalSettings(
                name=model.name,
                path=model.path,
                max_inputs=model.max_inputs,
                max_batch=model.max_batch,
                truncate=model.truncate,
                threads=model.threads,
            )
        )
    raise ValueError(f"unknown provider {model.provider!r}")  # config validation stops this
