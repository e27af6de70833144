"""The Go and TypeScript clients generated from the contract, against the real gateway:
each example program (clients/go/example, clients/typescript/example) is built with its
own toolchain and run against the multimodal relay of the vendor world. The example checks
every answer itself and exits non-zero on a mismatch; a toolchain that is missing fails
the test (`scripts/setup test`, run by `make test`, installs them)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web
from conftest import PNG_1X1
from fakes import rerank_score
from vendor_world import CANARY, VendorWorld, model_entries

from embedgate.server.app import build_gateway
from embedgate.server.providers.registry import parse_config

ROOT = Path(__file__).resolve().parents[1]
TYPESCRIPT = ROOT / "clients" / "typescript"


async def run(*argv: str, timeout_s: float = 120) -> str:
    """Runs argv from the repository root and returns its output; fails unless it exits 0."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    text = out.decode()
    assert process.returncode == 0, f"{' '.join(argv)} exited {process.returncode}:\n{text}"
    return text


async def build_go(tmp_path: Path) -> list[str]:
    """Builds the Go example offline (GOPATH mode against Debian's Go sources)."""
    binary = tmp_path / "embedgate-example"
    await run("clients/go/build-example", str(binary))
    return [str(binary)]


_TSC_DONE: list[bool] = []


async def build_typescript(_tmp_path: Path) -> list[str]:
    """Type-checks (strict) and compiles the TypeScript examples into
    clients/typescript/dist (once per session)."""
    if not _TSC_DONE:
        tsc = TYPESCRIPT / "node_modules" / ".bin" / "tsc"
        assert tsc.exists(), f"{tsc} is missing: run scripts/setup test"
        await run(str(tsc), "-p", str(TYPESCRIPT))
        _TSC_DONE.append(True)
    return ["node", str(TYPESCRIPT / "dist" / "example" / "main.js")]


Build = Callable[[Path], Awaitable[list[str]]]


def expected_lines(world: VendorWorld, out: str, calls: int = 1, pipeline: bool = False) -> None:
    """What the example printed agrees with what the vendor was sent and answered, for
    ``calls`` runs of the checks (whose lines ``out`` holds, in order)."""
    received = world.fakes["aggregator"].received
    # The PNG went to the vendor as the bytes given.
    images = [
        base64.b64decode(item["image"])
        for r in received
        if r.path.endswith("/embeddings")
        for item in r.body["input"]
        if item.get("image")
    ]
    assert images == [PNG_1X1] * calls
    # The fake ranks by a known score: the order printed must be that one.
    reranks = [r.body for r in received if r.path.endswith("/rerank")]
    assert len(reranks) == calls
    query, documents = reranks[0]["query"], reranks[0]["documents"]
    order = sorted(range(len(documents)), key=lambda i: -rerank_score(query, documents[i]))
    lines = out.splitlines()
    per_run = len(lines) // calls
    for run_lines in (lines[n * per_run : (n + 1) * per_run] for n in range(calls)):
        listed, *rest = run_lines
        assert listed.startswith("ListModels: "), out
        assert listed.endswith("; agg embeds 1024 dimensions, agg-rerank reranks"), out
        assert rest == [
            "Embed text: 1 vector of 1024 dimensions",
            "Embed image: 1 vector of 1024 dimensions",
            "StreamEmbed: 3 inputs, each once",
            *(["EmbedPipeline: 3 requests, each answered once"] if pipeline else []),
            f"Rerank: documents in order [{' '.join(map(str, order))}], "
            f'best "{documents[order[0]]}"',
            "BadRequest: inputs is empty: give at least one input",
            "all checks passed",
        ], out


@pytest.mark.parametrize("build", [build_go, build_typescript], ids=["go", "typescript"])
async def test_example_calls_every_rpc(world: VendorWorld, build: Build, tmp_path: Path) -> None:
    """The example lists the models, embeds a text and a PNG, streams, reranks and reads
    the BadRequest of an empty Embed, each answer checked (the TypeScript one over gRPC
    also runs an EmbedPipeline); what it prints agrees with what the vendor was sent and
    answered."""
    command = await build(tmp_path)
    out = await run(
        *command, "--addr", world.target, "--model", "agg", "--rerank-model", "agg-rerank"
    )
    expected_lines(world, out, pipeline=build is build_typescript)


@pytest.mark.parametrize("transport", ["connect", "connect-h2", "grpc-web"])
async def test_connect_node_over_the_http_port(
    world: VendorWorld, transport: str, tmp_path: Path
) -> None:
    """@connectrpc/connect-node's Connect (JSON over HTTP/1.1, binary over h2c) and gRPC-Web
    transports, on the HTTP port, pass the same checks as gRPC: every RPC, the BadRequest
    read from the error's details, and EmbedPipeline where HTTP/2 carries it."""
    command = await build_typescript(tmp_path)
    out = await run(
        *command,
        "--transport",
        transport,
        "--addr",
        world.http_target,
        "--model",
        "agg",
        "--rerank-model",
        "agg-rerank",
    )
    expected_lines(world, out, pipeline=transport == "connect-h2")


async def test_connect_web_in_headless_chromium(world: VendorWorld, tmp_path: Path) -> None:
    """@connectrpc/connect-web in a real headless Chromium: a page served from another
    origin runs the checks over Connect (JSON) and gRPC-Web on fetch, across CORS that
    allows exactly that origin, and reports what it printed."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run scripts/setup test (Debian's chromium package)"
    page = tmp_path / "page"
    page.mkdir()
    esbuild = TYPESCRIPT / "node_modules" / ".bin" / "esbuild"
    await run(
        str(esbuild),
        str(TYPESCRIPT / "example" / "browser.ts"),
        "--bundle",
        "--format=esm",
        "--platform=browser",
        f"--outfile={page / 'browser.js'}",
    )
    (page / "index.html").write_text(
        '<!doctype html><meta charset="utf-8"><title>embedgate</title>'
        '<body style="white-space: pre"><script type="module" src="browser.js"></script>'
    )
    reported: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

    async def report(request: web.Request) -> web.Response:
        if not reported.done():
            reported.set_result(json.loads(await request.text()))
        return web.Response(text="thanks")

    app = web.Application()
    app.router.add_post("/report", report)
    app.router.add_static("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    key = tmp_path / "vendor-key"
    key.write_text(CANARY + "\n")
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "http_port": 0, "cors_origins": [origin]},
            "cache": {"enabled": False},
            "models": model_entries(world.fakes, key),
        }
    )
    gateway = build_gateway(config)
    await gateway.start()
    query = urlencode(
        {
            "base": f"http://127.0.0.1:{gateway.http_port}",
            "model": "agg",
            "rerank": "agg-rerank",
            "report": "/report",
        }
    )
    browser = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"{origin}/index.html?{query}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        lines = await asyncio.wait_for(reported, 90)
    finally:
        browser.kill()
        await browser.wait()
        await gateway.stop(grace=0)
        await runner.cleanup()
    for transport in ("connect", "grpc-web"):
        prefix = f"{transport} "
        assert all(line.startswith(("connect ", "grpc-web ")) for line in lines), lines
        mine = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
        assert mine[-1] == "all checks passed", lines
    expected_lines(world, "\n".join(line.split(" ", 1)[1] for line in lines), calls=2)
