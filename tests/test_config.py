"""The YAML configuration: validated at start, every bad key named, a default without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from embedgate.server.app import build_gateway
from embedgate.server.config import DEFAULT_MAX_REQUEST_BYTES, ConfigError
from embedgate.server.providers.registry import (
    DIALECTS,
    MODEL_SETTINGS,
    PROVIDERS,
    default_config,
    load_config,
    parse_config,
)
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc


def test_no_config_serves_the_embedded_default() -> None:
    """Without a file there is one model, all-minilm-l6-v2, on the local provider."""
    config = load_config(None)
    assert config == default_config()
    assert [(m.name, m.provider) for m in config.models] == [("all-minilm-l6-v2", "local")]
    assert config.server.port == 50051
    assert config.server.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"models": [{"name": "a", "provider": "foo"}]},
            "models[0].provider: unknown provider 'foo'",
        ),
        ({"models": [{"name": "a", "provider": "local", "max_batch": 0}]}, "models[0].max_batch:"),
        ({"models": []}, "models:"),
        ({}, "models: Field required"),
        ({"models": [{"provider": "local"}]}, "models[0].name: Field required"),
        ({"models": [{"name": "bad name!", "provider": "local"}]}, "models[0].name:"),
        (
            {"models": [{"name": "a", "provider": "local"}, {"name": "a", "provider": "local"}]},
            "models[1].name: 'a'",
        ),
        ({"modles": [], "models": [{"name": "a", "provider": "local"}]}, "modles: Extra inputs"),
        (
            {"server": {"shutdown_grace_s": -1}, "models": [{"name": "a", "provider": "local"}]},
            "server.shutdown_grace_s:",
        ),
        (["models"], "top level must be a mapping"),
    ],
)
def test_bad_configs_name_the_bad_key(raw: object, message: str) -> None:
    """Each mistake is reported with its key path."""
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "embedgate.yaml")
    assert str(caught.value).startswith("embedgate.yaml: ")
    assert message in str(caught.value)


def test_every_provider_is_derived_from_the_one_list_of_dialects() -> None:
    """The provider names and the settings classes the file may use come from the
    registry's one list of dialects: each dialect's settings are tagged with its name."""
    assert ("local", *DIALECTS) == PROVIDERS
    tags = [settings.model_fields["provider"].default for settings in MODEL_SETTINGS]
    assert tags == [*PROVIDERS, "deployed"]  # and a model served by deployments of them
    for name, dialect in DIALECTS.items():
        assert dialect.vendor == name
        assert dialect.settings_type.__module__ == dialect.__module__, "one home per vendor"
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [{"name": "a", "provider": "nope"}]})
    assert f"(known: {', '.join(PROVIDERS)})" in str(caught.value)


def test_reading_the_configuration_loads_no_provider() -> None:
    """`embedgate.server.config` is the bottom of the house: importing it loads neither
    the HTTP stack, nor Prometheus, nor numpy (the CLI imports it for every command)."""
    probe = (
        "import sys, embedgate.server.config\n"
        "heavy = ('numpy', 'aiohttp', 'httpx', 'prometheus_client', 'grpc', 'torch')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that cannot be read is reported with the path."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.local
async def test_a_configured_local_model_is_served_under_its_name(tmp_path: Path) -> None:
    """`models: [{name: minilm, provider: local}]` serves the local model as `minilm`."""
    file = tmp_path / "embedgate.yaml"
    file.write_text(
        "server:\n  host: 127.0.0.1\n  port: 0\n"
        "models:\n  - name: minilm\n    provider: local\n    max_inputs: 8\n"
    )
    gateway = build_gateway(load_config(file))
    port = await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert [(m.name, m.max_inputs_per_call) for m in models.models] == [("minilm", 8)]
            response = await stub.Embed(
                pb.EmbedRequest(model="minilm", inputs=[pb.Input(text="hi")]), timeout=30
            )
            assert len(response.embeddings[0].values) == 384
    finally:
        await gateway.stop(grace=1)
