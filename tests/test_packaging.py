"""Installing from a clone, as a user would: the README's pip lines, each in a fresh
virtualenv inside a clone (the server with the client and the ``embedgate`` command; the
client alone, without the server or torch), and a build from a git URL. What is tested
is the last commit (``git clone`` of this repository)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from gateways import wait_serving
from test_readme import readme_blocks

from embedgate.client.cli import SERVER_MISSING

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT = 600


def _run(*args: str | Path, timeout: float = PIP_TIMEOUT, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("clone") / "embedgate"
    _run("git", "clone", "--quiet", "--no-hardlinks", REPO, where, timeout=120)
    return where


def _venv(where: Path) -> Path:
    _run(sys.executable, "-m", "venv", where, timeout=120)
    return where / "bin"


def _installed(bin_dir: Path) -> set[str]:
    listed = _run(bin_dir / "python", "-m", "pip", "list", "--format=freeze", timeout=120)
    return {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}


def readme_pip_lines() -> list[list[str]]:
    """The README's pip commands (its `pip` block), as argument lists."""
    (block,) = readme_blocks("pip")
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.code.splitlines() if line]
    assert all(words[:2] == ["pip", "install"] for words in commands), commands
    return commands


async def _install_both(clone: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The README's two pip lines, each in its own fresh virtualenv, at once (each
    mostly waits on pip)."""
    server_line, client_line = readme_pip_lines()
    assert server_line[2:] == ["."]
    assert client_line[2:] == ["./clients/python"]

    def install(name: str, words: list[str]) -> Path:
        bin_dir = _venv(tmp_path / name)
        _run(bin_dir / "python", "-m", *words, "-q", cwd=clone)
        return bin_dir

    return await asyncio.gather(
        asyncio.to_thread(install, "server-venv", server_line),
        asyncio.to_thread(install, "client-venv", client_line),
    )


async def test_server_and_client_install_from_a_clone(clone: Path, tmp_path: Path) -> None:
    """`pip install .` in a clone gives a server that starts and answers, with the client
    and the command, and no torch (that is `[local]`). `pip install ./clients/python`
    gives the client alone: no server, no torch, and a `serve` that says how to get the
    server."""
    server_bin, client_bin = await _install_both(clone, tmp_path)

    server_packages = _installed(server_bin)
    assert "embedgate" in server_packages
    assert "embedgate-client" not in server_packages
    assert "torch" not in server_packages
    version = _run(server_bin / "embedgate", "--version", timeout=60).strip()
    assert version == "embedgate 0.1.0 (server and client)"
    await _serve_and_check(server_bin, tmp_path)

    client_packages = _installed(client_bin)
    assert "embedgate-client" in client_packages
    assert not {"embedgate", "torch", "aiohttp", "sentence-transformers"} & client_packages
    version = _run(client_bin / "embedgate", "--version", timeout=60).strip()
    assert version == "embedgate 0.1.0 (client)"
    missing = await asyncio.create_subprocess_exec(
        client_bin / "embedgate", "serve", stderr=asyncio.subprocess.PIPE
    )
    _, said = await asyncio.wait_for(missing.communicate(), 60)
    assert missing.returncode == 2
    assert said.decode().strip() == SERVER_MISSING


async def _serve_and_check(bin_dir: Path, tmp_path: Path) -> None:
    """The installed server starts on a vendor-model config and answers health."""
    config = tmp_path / "vendor.yaml"
    config.write_text(
        "models:\n  - name: te\n    provider: openai\n    base_url: http://127.0.0.1:9/v1\n"
        "    vendor_model: te\n    dimensions: 8\n"
    )
    process = await asyncio.create_subprocess_exec(
        bin_dir / "embedgate",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        "--uds",
        str(tmp_path / "s.sock"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_serving(f"unix:{tmp_path / 's.sock'}", 30)
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


def test_the_server_builds_from_a_git_url(clone: Path) -> None:
    """`pip install git+URL` of the repository: pip clones it and builds the server's
    distribution (checked with pip's resolver, without installing)."""
    report = _run(
        sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet",
        "--report", "-", f"git+file://{clone}", timeout=300,
    )  # fmt: skip
    assert '"name": "embedgate"' in report


@pytest.mark.local
def test_the_local_extra_resolves_from_the_root() -> None:
    """`pip install '.[local]'` at the root resolves: no dependency on a distribution
    that is on no index (checked with pip's resolver, against this environment, which
    has the [local] extra: without it pip would fetch torch's metadata and more)."""
    report = _run(
        sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation",
        "--quiet", "--report", "-", f"{REPO}[local]", timeout=300,
    )  # fmt: skip
    assert '"name": "embedgate"' in report


def test_the_server_lists_the_clients_dependencies() -> None:
    """The server's distribution carries the client packages, so it declares every
    dependency the client declares."""
    server = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    client = tomllib.loads((REPO / "clients/python/pyproject.toml").read_text("utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(client["dependencies"]) <= names(server["dependencies"])
    assert client["scripts"] == server["scripts"]
    assert client["version"] == server["version"]
