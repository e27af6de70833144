"""Every example config in examples/ loads as written and serves: vendor models pointed at
the loopback fakes of their vendors (keys given through the variables or files the
example names), the local model as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import PNG_1X1
from vendor_world import CANARY, VendorWorld, texts

from embedgate.server.app import build_gateway
from embedgate.server.providers.registry import load_config, parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
TEXTS = {path: path.read_text(encoding="utf-8") for path in EXAMPLES}


def serves_locally(example: Path) -> bool:
    """Whether the example has a model on the local provider (it needs torch)."""
    models = yaml.safe_load(TEXTS[example]).get("models") or []
    return any(model.get("provider") == "local" for model in models)


def test_there_are_examples() -> None:
    """The examples the README points to exist."""
    assert {path.name for path in EXAMPLES} >= {
        "openai.yaml",
        "vendors.yaml",
        "local.yaml",
        "deployments.yaml",
    }


@pytest.mark.parametrize(
    "example",
    [
        pytest.param(path, id=path.name, marks=[pytest.mark.local] if serves_locally(path) else [])
        for path in EXAMPLES
    ],
)
async def test_an_example_config_loads_and_serves(
    example: Path, world: VendorWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file as written passes validation; then, with vendors on loopback, every model
    serves Embed and StreamEmbed (or Rerank, for a reranker)."""
    load_config(str(example))
    raw: dict[str, Any] = yaml.safe_load(TEXTS[example])
    secret = tmp_path / "key"
    secret.write_text(CANARY + "\n")
    for model in raw["models"]:
        # The space check needs deployments of one space; the fakes are each their own
        # (the check is tested in test_deployments.py).
        model.pop("space_check", None)
        for entry in model.get("deployments", [model]):
            if entry["provider"] == "local":
                continue
            entry["base_url"] = world.fakes[entry["provider"]].base_url
            if "api_key_env" in entry:
                monkeypatch.setenv(entry["api_key_env"], CANARY)
            # A pool's keys differ; the fakes take one key: the others are refused and
            # leave the pool, as they would at the vendor.
            for position, env in enumerate(entry.get("api_key_envs", [])):
                name = env if isinstance(env, str) else env["env"]
                monkeypatch.setenv(name, CANARY if position == 0 else f"{CANARY}-{position}")
            if "api_key_file" in entry:
                entry["api_key_file"] = str(secret)
    server = raw.setdefault("server", {})
    server.update(host="127.0.0.1", port=0)
    if "metrics_port" in server:
        server["metrics_port"] = 0
    gateway = build_gateway(parse_config(raw, example.name))
    port = await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _exercise(pb_grpc.EmbeddingServiceStub(channel))
    finally:
        await gateway.stop(grace=0)


async def _exercise(stub: pb_grpc.EmbeddingServiceAsyncStub) -> None:
    listed = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
    assert listed
    for info in listed:
        if not info.embeds:
            ranked = await stub.Rerank(
                pb.RerankRequest(model=info.name, query="q", documents=["a", "b"]), timeout=10
            )
            assert ranked.method == pb.RERANK_METHOD_VENDOR
            assert len(ranked.results) == 2
            continue
        inputs = texts("example one", "example two")
        if pb.MODALITY_IMAGE in info.modalities:
            inputs.append(pb.Input(image=pb.Image(data=PNG_1X1)))
        response = await stub.Embed(pb.EmbedRequest(model=info.name, inputs=inputs), timeout=30)
        assert len(response.embeddings) == len(inputs)
        assert len(response.embeddings[0].values) == info.default_dimensions
        stream = stub.StreamEmbed(
            pb.StreamEmbedRequest(request=pb.EmbedRequest(model=info.name, inputs=inputs)),
            timeout=30,
        )
        assert sorted([message.index async for message in stream]) == list(range(len(inputs)))
