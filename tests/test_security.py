"""TLS and mutual TLS with certificates made here, the Unix socket listener, the
plaintext health port, and callers' bearer tokens."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import structlog
from certs import Authority
from conftest import rich_error
from fakes import FakeVendor, make_fake
from gateways import health_status, key_file, openai_model, running
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_cli import run_cli

from embedgate import client as eg
from embedgate.server.app import build_gateway
from embedgate.server.config import ConfigError
from embedgate.server.providers.registry import parse_config
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

# Canaries: they must never appear in a log line or an error.
TOKEN = "caller-token-canary-5d1f"  # noqa: S105
LIMITED_TOKEN = "limited-token-canary-9e07"  # noqa: S105
# A model that is never called: for start-up checks.
UNCALLED = {
    "name": "m",
    "provider": "openai",
    "base_url": "http://127.0.0.1:9",
    "vendor_model": "text-embedding-3-small",
}


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai", api_key="vendor-key-for-tests") as vendor:
        yield vendor


def embed_request(model: str = "m", text: str = "two apples") -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, inputs=[pb.Input(text=text)])


async def embeds(channel: grpc.aio.Channel, model: str = "m") -> int:
    reply = await pb_grpc.EmbeddingServiceStub(channel).Embed(embed_request(model), timeout=5)
    return len(reply.embeddings[0].values)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embeds(channel)
    return caught.value.code()


# -- TLS ---------------------------------------------------------------------------


async def test_tls_serves_callers_that_trust_its_ca_and_health_stays_plaintext(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """With TLS on, callers that trust the server's CA are served; plaintext callers and
    callers that trust another CA get no connection. The health port answers health in
    plaintext, and nothing else."""
    ca, stranger = Authority("embedgate test CA"), Authority("another CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    model = openai_model(fake, key_file(tmp_path))
    async with running([model], tls=tls, health_port=0) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        trusted = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
        async with grpc.aio.secure_channel(target, trusted) as channel:
            assert await embeds(channel) == fake.dims
        # Plaintext, or TLS that trusts another CA: no connection.
        async with grpc.aio.insecure_channel(target) as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        untrusting = grpc.ssl_channel_credentials(root_certificates=stranger.cert_pem)
        async with grpc.aio.secure_channel(target, untrusting) as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        # Probes reach health in plaintext on its own port, and only health.
        assert gateway.health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.health_port}") as channel:
            assert await health_status(channel) == "SERVING"
            assert await health_status(channel, "embedgate.v1.EmbeddingService") == "SERVING"
            assert await health_status(channel, "m") == "SERVING"
            assert await refused(channel) == grpc.StatusCode.UNIMPLEMENTED


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """With client_ca_file set, only callers with a certificate from that CA are served;
    no certificate, or one from another CA, gets no connection (and never reaches the
    vendor)."""
    ca, stranger = Authority("embedgate test CA"), Authority("another CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    clients_ca = tmp_path / "clients-ca.crt"
    clients_ca.write_bytes(ca.cert_pem)
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(clients_ca)}
    known, unknown = ca.issue("app", server=False), stranger.issue("intruder", server=False)
    async with running([openai_model(fake, key_file(tmp_path))], tls=tls) as gateway:
        target = f"127.0.0.1:{gateway.port}"

        def credentials(client: tuple[bytes, bytes] | None) -> grpc.ChannelCredentials:
            if client is None:
                return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
            return grpc.ssl_channel_credentials(
                root_certificates=ca.cert_pem, private_key=client[1], certificate_chain=client[0]
            )

        async with grpc.aio.secure_channel(target, credentials((known.cert, known.key))) as channel:
            assert await embeds(channel) == fake.dims
        for client in (None, (unknown.cert, unknown.key)):
            async with grpc.aio.secure_channel(target, credentials(client)) as channel:
                assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
    assert len(fake.received) == 1  # only the caller with a known certificate got through


async def test_an_unreadable_certificate_fails_start_up_naming_the_file(tmp_path: Path) -> None:
    """A certificate or key that cannot be read stops start-up with a ConfigError naming
    the setting."""
    config = parse_config(
        {
            "server": {
                "port": 0,
                "tls": {"cert_file": str(tmp_path / "missing.crt"), "key_file": "k"},
            },
            "models": [UNCALLED],
        }
    )
    gateway = build_gateway(config)
    with pytest.raises(ConfigError, match=r"server\.tls\.(key|cert)_file: cannot read"):
        await gateway.start()
    await gateway.stop(grace=0)


# -- the Unix domain socket --------------------------------------------------------


async def test_unix_socket_listener_replaces_a_stale_socket_and_removes_it_on_stop(
    fake: FakeVendor, tmp_path: Path
) -> None:
    """uds_path serves on a Unix socket (TCP too), replacing a stale socket a killed
    process left there, and the socket is removed on stop."""
    path = tmp_path / "embedgate.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # what a killed process leaves behind
    stale.close()
    async with running([openai_model(fake, key_file(tmp_path))], uds_path=str(path)) as gateway:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            assert await embeds(channel) == fake.dims
            assert await health_status(channel) == "SERVING"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            assert await embeds(channel) == fake.dims  # TCP as well
    assert not path.exists()


async def test_a_file_where_the_socket_goes_is_left_alone(fake: FakeVendor, tmp_path: Path) -> None:
    """A file at uds_path that is not a socket stops start-up and is left as it was."""
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        async with running([openai_model(fake, key_file(tmp_path))], uds_path=str(path)):
            pass
    assert path.read_text() == "keep me"


# -- bearer tokens -----------------------------------------------------------------


def with_token(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def reflected_services(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> str:
    """The services reflection lists, or the code it failed with."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        async for reply in stub.ServerReflectionInfo(iter([ask]), metadata=metadata, timeout=5):
            return " ".join(s.name for s in reply.list_services_response.service)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return ""


@pytest_asyncio.fixture
async def guarded(
    fake: FakeVendor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[pb_grpc.EmbeddingServiceAsyncStub, grpc.aio.Channel]]:
    token_file = tmp_path / "app-token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("EMBEDGATE_TEST_LIMITED_TOKEN", LIMITED_TOKEN)
    keys = key_file(tmp_path)
    auth = {
        "tokens": [
            {"name": "app", "token_file": str(token_file)},
            {"name": "limited", "token_env": "EMBEDGATE_TEST_LIMITED_TOKEN", "models": ["m"]},
        ]
    }
    models = [openai_model(fake, keys), openai_model(fake, keys, name="other")]
    async with (
        running(models, auth=auth) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield pb_grpc.EmbeddingServiceStub(channel), channel


async def test_calls_without_a_valid_bearer_token_are_unauthenticated(
    guarded: tuple[pb_grpc.EmbeddingServiceAsyncStub, grpc.aio.Channel], fake: FakeVendor
) -> None:
    """With tokens configured, a call without one, with a wrong one or without the Bearer
    scheme is UNAUTHENTICATED (MISSING_TOKEN, INVALID_TOKEN), streams and reflection
    included, and reaches no vendor; health needs no token; "bearer" in any case works;
    no log line holds the token."""
    stub, channel = guarded
    cases = {
        "MISSING_TOKEN": (),
        "INVALID_TOKEN": with_token("not-the-token"),
    }
    with structlog.testing.capture_logs() as logs:
        for reason, metadata in [*cases.items(), ("MISSING_TOKEN", (("authorization", TOKEN),))]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(embed_request(), metadata=metadata, timeout=5)
            error = rich_error(caught.value)
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
            assert error.reason == reason
            with pytest.raises(grpc.aio.AioRpcError) as listing:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=5)
            assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Streams are guarded the same way.
        stream = stub.StreamEmbed(pb.StreamEmbedRequest(request=embed_request()), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [reply async for reply in stream]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health answers without a token: probes carry none. Reflection needs one.
        assert await health_status(channel) == "SERVING"
        assert await reflected_services(channel, ()) == "UNAUTHENTICATED"
        assert "embedgate.v1.EmbeddingService" in await reflected_services(
            channel, with_token(TOKEN)
        )
        # The right token, in any case of "Bearer".
        reply = await stub.Embed(
            embed_request(), metadata=(("authorization", f"bearer {TOKEN}"),), timeout=5
        )
    assert len(reply.embeddings) == 1
    assert len(fake.received) == 1  # the refused calls never reached the vendor
    refusals = [event for event in logs if event.get("reason") in cases]
    assert len(refusals) == 8  # 3 x (Embed, ListModels), the stream, reflection
    assert all(TOKEN not in repr(event) for event in logs)


async def test_a_token_limited_to_some_models_is_denied_the_others(
    guarded: tuple[pb_grpc.EmbeddingServiceAsyncStub, grpc.aio.Channel], fake: FakeVendor
) -> None:
    """A token limited to some models is PERMISSION_DENIED (MODEL_NOT_PERMITTED) on the
    others, in every RPC (a pipeline request on its own), without the token in the
    message; ListModels shows it only its models."""
    stub, _ = guarded
    limited = with_token(LIMITED_TOKEN)
    reply = await stub.Embed(embed_request("m"), metadata=limited, timeout=5)
    assert len(reply.embeddings) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(embed_request("other"), metadata=limited, timeout=5)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "MODEL_NOT_PERMITTED"
    assert error.metadata == {"model": "other", "token": "limited"}
    assert LIMITED_TOKEN not in error.message
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rerank(
            pb.RerankRequest(model="other", query="q", documents=["a"]), metadata=limited, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stream = stub.StreamEmbed(
        pb.StreamEmbedRequest(request=embed_request("other")), metadata=limited, timeout=5
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [reply async for reply in stream]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    pipeline = stub.EmbedPipeline(
        iter(
            [
                pb.EmbedPipelineRequest(correlation_id="1", request=embed_request("other")),
                pb.EmbedPipelineRequest(correlation_id="2", request=embed_request("m", "b")),
            ]
        ),
        metadata=limited,
        timeout=5,
    )
    replies = {reply.correlation_id: reply async for reply in pipeline}
    assert replies["1"].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert len(replies["2"].response.embeddings) == 1
    # It sees only its models; the unlimited token sees all.
    listed = await stub.ListModels(pb.ListModelsRequest(), metadata=limited, timeout=5)
    assert [model.name for model in listed.models] == ["m"]
    listed = await stub.ListModels(pb.ListModelsRequest(), metadata=with_token(TOKEN), timeout=5)
    assert [model.name for model in listed.models] == ["m", "other"]
    assert len(fake.received) == 2  # the two calls to m


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ({"name": "t", "token_file": "f", "models": ["nope"]}, "no model named 'nope'"),
        ({"name": "t"}, "give token_env or token_file"),
        ({"name": "t", "token_env": "A", "token_file": "f"}, "give token_env or token_file"),
    ],
)
def test_token_settings_are_checked_at_start_up(token: dict[str, object], message: str) -> None:
    """A token entry naming a model that does not exist, or with neither or both of
    token_env and token_file, is a configuration error saying so."""
    with pytest.raises(ConfigError, match=message):
        parse_config(
            {
                "server": {"auth": {"tokens": [token]}},
                "models": [UNCALLED],
            }
        )


def test_an_unreadable_token_file_stops_start_up_without_printing_tokens(tmp_path: Path) -> None:
    """A token file that is missing or empty stops start-up with a ConfigError naming
    the setting and the problem."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, problem in ((tmp_path / "missing", "cannot read"), (empty, "is empty")):
        config = parse_config(
            {
                "server": {"auth": {"tokens": [{"name": "t", "token_file": str(path)}]}},
                "models": [UNCALLED],
            }
        )
        with pytest.raises(
            ConfigError, match=rf"server\.auth\.tokens\[0\]\.token_file: .*{problem}"
        ):
            build_gateway(config)


# -- the Python client and the command line over TLS with a token --------------------


async def test_the_python_client_and_cli_speak_mutual_tls_with_a_token(
    fake: FakeVendor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python client and the command line reach a server with mutual TLS and a token
    (the command line's from EMBEDGATE_TOKEN); a wrong token is INVALID_TOKEN, and
    without a client certificate there is no connection."""
    ca = Authority("embedgate test CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    client_cert, client_key = ca.issue("app", server=False).write(tmp_path, "client")
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca_file)}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    auth = {"tokens": [{"name": "app", "token_file": str(token_file)}]}
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client_key.read_bytes(),
        certificate_chain=client_cert.read_bytes(),
    )
    model = openai_model(fake, key_file(tmp_path))
    async with running([model], tls=tls, auth=auth) as gateway:
        target = f"localhost:{gateway.port}"
        async with eg.AsyncClient(target, token=TOKEN, credentials=credentials) as client:
            vectors = await client.embed_texts(["two apples"], model="m")
            assert vectors.shape == (1, fake.dims)
        wrong = TOKEN[::-1]
        async with eg.AsyncClient(target, token=wrong, credentials=credentials) as client:
            with pytest.raises(eg.UnauthenticatedError) as caught:
                await client.list_models()
            assert caught.value.reason == "INVALID_TOKEN"
        tls_args = ["--tls-ca", str(ca_file), "--tls-cert", str(client_cert)]
        tls_args += ["--tls-key", str(client_key)]
        monkeypatch.setenv("EMBEDGATE_TOKEN", TOKEN)
        code, out, err = await run_cli("models", "--target", target, *tls_args)
        assert code == 0, err
        assert out.startswith("m  provider=openai")
        code, out, err = await run_cli("health", "--target", target, *tls_args)
        assert (code, out.strip()) == (0, "SERVING")
        # Without the client certificate there is no connection at all.
        code, _, err = await run_cli("health", "--target", target, "--tls-ca", str(ca_file))
        assert code == 1
        assert "UNAVAILABLE" in err
