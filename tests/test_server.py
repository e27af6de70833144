"""Health, reflection and graceful shutdown of the real server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import MULTI, ScriptedProvider, Served, server_settings
from fakes import Fault, make_fake
from gateways import free_port, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embedgate.server.edge.server import Gateway
from embedgate.server.routing.router import Router
from embedgate.v1 import embedding_service_pb2 as pb
from embedgate.v1 import embedding_service_pb2_grpc as pb_grpc

SERVICE = "embedgate.v1.EmbeddingService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_overall_and_per_service(served: Served) -> None:
    """Standard health checking answers SERVING for "" and for the embedding service,
    and NOT_FOUND for a service it does not know."""
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(served: Served) -> None:
    """Server reflection lists the services and serves the contract's descriptor."""
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert any(b"embedgate/v1/embedding_service.proto" in f for f in files)


async def test_shutdown_drains_in_flight_calls() -> None:
    """On stop, health turns NOT_SERVING at once, in-flight calls finish, new calls are
    refused."""
    slow = ScriptedProvider(MULTI, delay_s=1.0)
    gateway = Gateway(Router([slow]), server_settings())
    port = await gateway.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await watch.read()).status == SERVING
        in_flight = asyncio.ensure_future(
            stub.Embed(pb.EmbedRequest(model=MULTI, inputs=[pb.Input(text="slow")]), timeout=10)
        )
        await asyncio.sleep(0.3)
        assert slow.in_flight == 1
        stopping = asyncio.ensure_future(gateway.stop(grace=5))
        started = time.perf_counter()
        assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
        assert time.perf_counter() - started < 0.5
        response = await in_flight
        assert len(response.embeddings) == 1
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(
                pb.EmbedRequest(model=MULTI, inputs=[pb.Input(text="late")]), timeout=2
            )
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_shutdown_cancels_calls_that_outlast_the_grace_period() -> None:
    """A call still running when the grace period ends is cancelled, not waited for."""
    slow = ScriptedProvider(MULTI, delay_s=30.0)
    gateway = Gateway(Router([slow]), server_settings())
    port = await gateway.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        call = asyncio.ensure_future(
            stub.Embed(pb.EmbedRequest(model=MULTI, inputs=[pb.Input(text="x")]), timeout=60)
        )
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        await gateway.stop(grace=0.5)
        assert time.perf_counter() - started < 5
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert slow.in_flight == 0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.local
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_embedgate_serve_answers_and_exits_0_on_a_signal(sig: signal.Signals) -> None:
    """`embedgate serve` with no config serves the default model with 384-dimension
    vectors, and on SIGTERM/SIGINT drains and exits 0."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedgate.client.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env={k: v for k, v in _env().items() if k != "EMBEDGATE_CONFIG"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_serving(f"127.0.0.1:{port}", 60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            response = await stub.Embed(
                pb.EmbedRequest(model="all-minilm-l6-v2", inputs=[pb.Input(text="two apples")]),
                timeout=30,
            )
            assert len(response.embeddings[0].values) == 384
        process.send_signal(sig)
        code = await asyncio.wait_for(process.wait(), 30)
        _, stderr = await process.communicate()
        assert code == 0, stderr.decode()
        assert b"server_stopped" in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("models:\n  - name: m\n    provider: nosuch\n", "models[0].provider"),
        ("models:\n  - name: m\n    provider: local\n    max_batch: 0\n", "models[0].max_batch"),
        ("models:\n  - name: m\n    provider: local\n    colour: blue\n", "models[0].colour"),
        ("server:\n  port: 99999\nmodels:\n  - name: m\n    provider: local\n", "server.port"),
        ("models: [\n", "not valid YAML"),
        (
            "models:\n  - name: r\n    provider: rzenembed\n    api_key_env: EMBEDGATE_NO_SUCH\n",
            "models[0].api_key_env: environment variable EMBEDGATE_NO_SUCH is not set",
        ),
        (
            "models:\n  - name: r\n    provider: rzenembed\n    api_key_file: /nonexistent/k\n",
            "models[0].api_key_file: cannot read /nonexistent/k",
        ),
        (
            "models:\n  - name: o\n    provider: openai\n    vendor_model: my-embedder\n",
            "models[0].dimensions: is required",
        ),
        ("models:\n  - name: s\n    provider: scnet\n", "api_key_env or api_key_file is required"),
    ],
)
async def test_a_bad_config_file_fails_start_up_naming_the_key(
    tmp_path: Path, content: str, named: str
) -> None:
    """A bad config file stops start-up with exit code 2 and a message naming the key."""
    config = tmp_path / "embedgate.yaml"
    config.write_text(content)
    code, output = await _serve_until_exit(["--config", str(config)], _env())
    assert code == 2
    assert named in output


async def test_config_comes_from_the_environment_variable(tmp_path: Path) -> None:
    """EMBEDGATE_CONFIG names the config file when --config is not given."""
    config = tmp_path / "env.yaml"
    config.write_text("models:\n  - name: from-env\n    provider: nosuch\n")
    code, output = await _serve_until_exit([], {**_env(), "EMBEDGATE_CONFIG": str(config)})
    assert code == 2
    assert str(config) in output


async def test_a_start_up_failure_never_prints_the_key(tmp_path: Path) -> None:
    """A model that cannot start is reported without the key it was given."""
    canary = "sk-canary-startup-91d2"
    config = tmp_path / "embedgate.yaml"
    config.write_text(
        "models:\n  - name: r\n    provider: rzenembed\n    api_key_env: RZEN_KEY\n"
        "    dimensions: 1000\n"
    )
    code, output = await _serve_until_exit(
        ["--config", str(config)], {**_env(), "RZEN_KEY": canary}
    )
    assert code == 2
    assert "models[0].dimensions" in output
    assert canary not in output


async def _serve_until_exit(args: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    """Run `embedgate serve ARGS --port 0` to its exit: its code and all it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedgate.client.cli",
        "serve",
        *args,
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, stdout.decode() + stderr.decode()


def _vendor_config(tmp_path: Path, base_url: str, extra: str = "") -> Path:
    """A config with one OpenAI-compatible model at ``base_url``: start-up sends it
    nothing, so a server starts in a moment."""
    config = tmp_path / "embedgate.yaml"
    config.write_text(
        f"server:\n  shutdown_grace_s: 30\n{extra}"
        "models:\n  - name: te\n    provider: openai\n"
        f"    base_url: {base_url}\n    vendor_model: te\n    dimensions: 8\n"
    )
    return config


@pytest.mark.parametrize("listener", ["--port", "--metrics-port", "--health-port"])
async def test_a_second_server_on_a_busy_port_fails_to_start_naming_it(
    tmp_path: Path, listener: str
) -> None:
    """`embedgate serve` on a port a running server holds exits 1 at once and names the
    address, instead of sharing the port (gRPC's SO_REUSEPORT default) and splitting the
    first server's callers between the two."""
    first = Gateway(
        Router([ScriptedProvider(MULTI)]),
        server_settings().model_copy(update={"metrics_port": 0, "health_port": 0}),
    )
    await first.start()
    busy = {"--port": first.port, "--metrics-port": first.metrics_port}.get(
        listener, first.health_port
    )
    try:
        config = _vendor_config(tmp_path, "http://127.0.0.1:9/v1")
        args = ["--config", str(config), "--host", "127.0.0.1", listener, str(busy)]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedgate.client.cli",
            "serve",
            *args,
            *(["--port", str(free_port())] if listener != "--port" else []),
            env=_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1, stderr.decode()
        assert "cannot start: cannot listen for " in stderr.decode()
        assert f"127.0.0.1:{busy}" in stderr.decode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == SERVING  # the first server is untouched
    finally:
        await first.stop(grace=0)


async def test_a_live_unix_socket_is_not_taken_over(tmp_path: Path) -> None:
    """A socket file a server still answers on is another server's: start-up stops
    (exit 1) rather than unlinking it; the first server keeps its socket."""
    path = str(tmp_path / "eg.sock")
    first = Gateway(
        Router([ScriptedProvider(MULTI)]), server_settings().model_copy(update={"uds_path": path})
    )
    await first.start()
    try:
        config = _vendor_config(tmp_path, "http://127.0.0.1:9/v1")
        code, output = await _serve_until_exit(["--config", str(config), "--uds", path], _env())
        assert code == 1, output
        assert f"cannot listen on unix:{path}: another server is listening there" in output
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == SERVING
    finally:
        await first.stop(grace=0)
    assert not Path(path).exists()  # noqa: ASYNC240 - one stat; the first server removed it


async def test_a_second_signal_during_the_drain_exits_at_once(tmp_path: Path) -> None:
    """SIGTERM starts the drain (an RPC is in flight, its vendor hangs, the grace period
    is 30 s); a second signal then ends the process at once, with 128 + the signal."""
    async with make_fake("openai") as vendor:
        vendor.always(Fault.hang())
        port = free_port()
        config = _vendor_config(tmp_path, vendor.base_url, extra="  default_deadline_s: 60\n")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedgate.client.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            env={**_env(), "OPENAI_API_KEY": "unused"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_serving(f"127.0.0.1:{port}", 30)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.EmbeddingServiceStub(channel).Embed(
                    pb.EmbedRequest(model="te", inputs=[pb.Input(text="hangs")]), timeout=60
                )
                waiting = asyncio.ensure_future(call)
                for _ in range(100):
                    if vendor.received:
                        break
                    await asyncio.sleep(0.05)
                assert vendor.received, "the call never reached the vendor"
                process.send_signal(signal.SIGTERM)
                assert process.stderr is not None
                drained = b""
                while b"server_draining" not in drained:
                    drained += await asyncio.wait_for(process.stderr.readline(), 10)
                # A repeat within 0.25 s is the same request (a process group's signal
                # passed on by a parent); a later one is a second request.
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert process.returncode is None
                process.send_signal(signal.SIGINT)
                code = await asyncio.wait_for(process.wait(), 10)
                waiting.cancel()
            rest = await process.stderr.read()
            assert code == 128 + signal.SIGINT.value
            assert b"shutdown_forced" in drained + rest
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
