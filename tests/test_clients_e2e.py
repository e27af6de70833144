"""The Go and TypeScript clients generated from the contract, against the real gateway:
each example program (clients/go/example, clients/typescript/example) is built with its
own toolchain and run against the multimodal relay of the vendor world. The example checks
every answer itself and exits non-zero on a mismatch; a toolchain that is missing fails
the test (`scripts/setup test`, run by `make test`, installs them)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import PNG_1X1
from fakes import rerank_score
from vendor_world import VendorWorld

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


async def build_typescript(tmp_path: Path) -> list[str]:
    """Type-checks (strict) and compiles the TypeScript example into clients/typescript/dist."""
    tsc = TYPESCRIPT / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), f"{tsc} is missing: run scripts/setup test"
    await run(str(tsc), "-p", str(TYPESCRIPT))
    return ["node", str(TYPESCRIPT / "dist" / "example" / "main.js")]


Build = Callable[[Path], Awaitable[list[str]]]


@pytest.mark.parametrize("build", [build_go, build_typescript], ids=["go", "typescript"])
async def test_example_calls_every_rpc(world: VendorWorld, build: Build, tmp_path: Path) -> None:
    """The example lists the models, embeds a text and a PNG, streams, reranks and reads
    the BadRequest of an empty Embed, each answer checked; what it prints agrees with
    what the vendor was sent and answered."""
    command = await build(tmp_path)
    out = await run(
        *command, "--addr", world.target, "--model", "agg", "--rerank-model", "agg-rerank"
    )
    received = world.fakes["aggregator"].received
    # The PNG went to the vendor as the bytes given.
    images = [
        base64.b64decode(item["image"])
        for r in received
        if r.path.endswith("/embeddings")
        for item in r.body["input"]
        if item.get("image")
    ]
    assert images == [PNG_1X1]
    # The fake ranks by a known score: the order printed must be that one.
    (rerank,) = [r.body for r in received if r.path.endswith("/rerank")]
    query, documents = rerank["query"], rerank["documents"]
    order = sorted(range(len(documents)), key=lambda i: -rerank_score(query, documents[i]))
    listed, *lines = out.splitlines()
    assert listed.startswith("ListModels: "), out
    assert listed.endswith("; agg embeds 1024 dimensions, agg-rerank reranks"), out
    assert lines == [
        "Embed text: 1 vector of 1024 dimensions",
        "Embed image: 1 vector of 1024 dimensions",
        "StreamEmbed: 3 inputs, each once",
        f'Rerank: documents in order [{" ".join(map(str, order))}], best "{documents[order[0]]}"',
        "BadRequest: inputs is empty: give at least one input",
        "all checks passed",
    ], out
