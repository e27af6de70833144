"""The README as a user follows it: every code block in it is run by a test, against the
server it says it needs. `make run` is run as written (with a free port added), the
commands and the Python example as written (with that server's address), the vendor
example with its vendor faked on loopback; the comments under a command are the output
it must print. Every link in the README and docs/ leads somewhere."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import pytest_asyncio
import yaml
from fakes import FakeVendor, make_fake
from gateways import free_port

from embedgate.client import Client
from embedgate.server.providers.registry import parse_config

REPO = Path(__file__).resolve().parents[1]
TYPESCRIPT = REPO / "clients" / "typescript"
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
BIN = Path(sys.executable).parent
VENV = BIN.parent
ANNOTATION = re.compile(r"<!-- readme-test: (.+?) -->")
# Each scenario names the server a block needs; `pip` blocks are run by test_packaging.
SCENARIOS = {
    "front-door",
    "http",
    "default",
    "vendor examples/openai.yaml",
    "pip",
    "config examples/deployments.yaml",
}


@dataclass(frozen=True)
class Block:
    scenario: str | None
    language: str
    code: str
    line: int


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the ``readme-test``
    annotation on the line before it (None when there is none)."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    start: int | None = None
    for number, line in enumerate(lines):
        if start is None and line.startswith("```"):
            start = number
        elif start is not None and line.strip() == "```":
            before = lines[start - 1] if start else ""
            match = ANNOTATION.fullmatch(before.strip())
            found.append(
                Block(
                    match[1] if match else None,
                    lines[start][3:].strip(),
                    "\n".join(lines[start + 1 : number]) + "\n",
                    start + 1,
                )
            )
            start = None
    assert start is None, f"{path}: a code block is never closed"
    return found


def readme_blocks(scenario: str) -> list[Block]:
    chosen = [block for block in blocks(README) if block.scenario == scenario]
    assert chosen, f"the README has no block for {scenario!r}"
    return chosen


def test_every_readme_block_is_run_by_a_test() -> None:
    """No code block in the README goes untested: each names the scenario that runs it."""
    for block in blocks(README):
        assert block.scenario in SCENARIOS, f"README.md line {block.line}: {block.scenario}"


DEPLOYMENT_KEYS = (
    "name",
    "provider",
    "vendor_model",
    "weight",
    "priority",
    "rate_limit",
    "token_limit",
    "base_url",
    "dimensions",
)


def test_the_readme_config_is_its_example_file() -> None:
    """The README's deployments configuration loads, and is the example file's model:
    the same space, checks, breaker and deployments (name, provider, vendor model,
    weight, priority, limits)."""
    (block,) = readme_blocks("config examples/deployments.yaml")
    shown = parse_config(yaml.safe_load(block.code)).models
    example = parse_config(
        yaml.safe_load((REPO / "examples" / "deployments.yaml").read_text(encoding="utf-8"))
    ).models

    def outline(models: list[Any]) -> list[Any]:
        return [
            (
                model.name,
                model.space,
                model.space_check,
                model.breaker,
                [{key: getattr(d, key) for key in DEPLOYMENT_KEYS} for d in model.deployments],
            )
            for model in models
        ]

    assert outline(shown) == outline(example)


@dataclass(frozen=True)
class Step:
    command: str
    expected: list[str]


def steps(code: str) -> list[Step]:
    """Commands of a shell block, each with the output lines shown under it as comments."""
    found: list[Step] = []
    for raw in code.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            assert found, "an output comment before any command"
            found[-1].expected.append(line.lstrip("#").strip())
        else:
            found.append(Step(line, []))
    return found


@dataclass
class Served:
    target: str
    process: subprocess.Popen[bytes]
    log: Path


def _make_run(command: str, args: list[str], log: Path, env: dict[str, str]) -> Served:
    """Start the README's `make run ...` line, with ``args`` added to its ARGS."""
    words = shlex.split(command.split("#", 1)[0])
    assert words[:2] == ["make", "run"], command
    given = [w.removeprefix("ARGS=") for w in words[2:] if w.startswith("ARGS=")]
    port = free_port()
    extra = " ".join([*given, *args, "--port", str(port)])
    # The child writes to its own copy of the descriptor; this one is closed at once.
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["make", "run", f"ARGS={extra}", f"VENV={VENV}"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with Client(target, timeout=2) as client:
                client.list_models()
                return Served(target, process, log)
        except Exception:  # not up yet
            time.sleep(0.5)
    raise AssertionError(f"make run never served: {log.read_text(errors='replace')[-3000:]}")


def _stop(served: Served) -> str:
    """Ctrl-C, as at a terminal: SIGINT to make and the server (one signal each)."""
    os.killpg(served.process.pid, signal.SIGINT)
    served.process.wait(timeout=60)
    return served.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The first command, `make run`, as the README gives it: the local model (tests that
    use it are marked `local`)."""
    block = readme_blocks("front-door")[0]
    commands = [step.command.split("#", 1)[0].strip() for step in steps(block.code)]
    # `make test` is this test suite itself: CI runs it.
    assert commands == ["make run", "make test"]
    log = tmp_path_factory.mktemp("make-run") / "log"
    served = _make_run(block.code.splitlines()[0], [], log, dict(os.environ))
    yield served
    output = _stop(served)
    assert "server_stopped" in output, output[-3000:]


def _run_steps(block: Block, target: str, env: dict[str, str]) -> None:
    for step in steps(block.code):
        command = step.command.replace(".venv/bin/", f"{BIN}/")
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=REPO,
            env={**env, "EMBEDGATE_TARGET": target},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{step.command}: {done.stdout}{done.stderr}"
        for expected in step.expected:
            assert expected in done.stdout, f"{step.command}: {expected!r} not in {done.stdout}"


@pytest.mark.local
def test_try_it_commands_print_what_the_readme_shows(default_server: Served) -> None:
    """Each command of the README's shell blocks for the default server exits 0 and
    prints the lines shown under it."""
    for block in readme_blocks("default"):
        if block.language == "sh":
            _run_steps(block, default_server.target, dict(os.environ))


@pytest.mark.local
def test_the_python_example_runs_as_written(default_server: Served, tmp_path: Path) -> None:
    """The README's Python example, against the default server, exits 0 and prints what
    its comments say."""
    (block,) = [b for b in readme_blocks("default") if b.language == "python"]
    assert "127.0.0.1:50051" in block.code
    script = tmp_path / "example.py"
    script.write_text(block.code.replace("127.0.0.1:50051", default_server.target))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    expected = []
    lines = block.code.splitlines()
    for number, line in enumerate(lines):
        if "print(" in line and "#" in line.split("print(", 1)[1]:
            expected.append(line.rsplit("#", 1)[1].strip())
        elif line.strip().startswith("#") and "print(" in lines[number - 1]:
            expected.append(line.strip().lstrip("#").strip())
    assert len(expected) >= 5
    for shown in expected:
        assert shown in done.stdout, f"{shown!r} not in {done.stdout}"


@pytest_asyncio.fixture
async def openai_fake() -> AsyncIterator[FakeVendor]:
    async with make_fake("openai") as fake:
        yield fake


# `make run` sets up the local model first (scripts/setup run installs torch and the [local]
# extra), whatever the config it is given.
@pytest.mark.local
async def test_the_vendor_example_serves_as_the_readme_shows(
    openai_fake: FakeVendor, tmp_path: Path
) -> None:
    """`make run ARGS="--config examples/openai.yaml"` with the key exported, and the
    vendor faked on loopback (the file's base_url pointed at it): the embed command prints
    what the README shows, and the vendor got the request with the key."""
    (block,) = readme_blocks("vendor examples/openai.yaml")
    config = yaml.safe_load((REPO / "examples/openai.yaml").read_text(encoding="utf-8"))
    for model in config["models"]:
        model["base_url"] = openai_fake.base_url
    parse_config(config)
    patched = tmp_path / "openai.yaml"
    patched.write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    commands = steps(block.code)
    exported = [s for s in commands if s.command.startswith("export ")]
    for step in exported:
        name = step.command.split()[1].split("=", 1)[0]
        env[name] = openai_fake.api_key or ""
    make = next(s for s in commands if s.command.startswith("make run"))
    line = make.command.replace("examples/openai.yaml", str(patched))
    served = await asyncio.to_thread(_make_run, line, [], tmp_path / "log", env)
    try:
        rest = Block(block.scenario, "sh", "", block.line)
        after = commands[commands.index(make) + 1 :]
        text = "\n".join(
            [s.command + "\n" + "\n".join(f"# {e}" for e in s.expected) for s in after]
        )
        await asyncio.to_thread(
            _run_steps, Block(rest.scenario, "sh", text, rest.line), served.target, env
        )
    finally:
        await asyncio.to_thread(_stop, served)
    assert openai_fake.received
    assert openai_fake.received[0].headers["authorization"] == f"Bearer {openai_fake.api_key}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@functools.cache
def in_repository() -> frozenset[str]:
    """The files git tracks or would track (not ignored), and the folders holding them,
    as paths from the root ("." for the root itself)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    files = [PurePosixPath(name) for name in listed.split("\0") if name]
    return frozenset(str(path) for file in files for path in (file, *file.parents))


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize(
    "page",
    [README, *DOCS, *(REPO / "clients").glob("*/README.md"), REPO / "deploy/kubernetes/README.md"],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_every_link_leads_somewhere(page: Path) -> None:
    """Relative links point at files of the repository that exist (not outside it, not
    ignored by git: a clone would not have them), and #anchors at headings that exist."""
    text = page.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page.name}: {target}"
        assert where.is_relative_to(REPO), f"{page.name}: {target} is outside the repository"
        inside = where.relative_to(REPO).as_posix()
        assert inside in in_repository(), f"{page.name}: {target} is ignored by git"
        if anchor and where.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", where.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: {target}"


def test_the_configuration_reference_parses() -> None:
    """The YAML blocks of docs/ are configurations embedgate accepts (a block showing one
    section is given a model, which every file needs)."""
    found = 0
    for page in DOCS:
        for block in blocks(page):
            if block.language == "yaml":
                raw = {"models": [{"name": "m", "provider": "local"}], **yaml.safe_load(block.code)}
                parse_config(raw, f"{page.name}:{block.line}")
                found += 1
    assert found


HTTP_PORT = "8080"


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    """The README's `make run` with an HTTP port (another free port in its place)."""
    block = readme_blocks("http")[0]
    (step,) = steps(block.code)
    assert f"--http-port {HTTP_PORT}" in step.command
    port = str(free_port())
    log = tmp_path_factory.mktemp("make-run-http") / "log"
    served = _make_run(step.command.replace(HTTP_PORT, port), [], log, dict(os.environ))
    yield served, port
    output = _stop(served)
    assert "server_stopped" in output, output[-3000:]


@pytest.mark.local
def test_the_http_doors_answer_as_the_readme_shows(
    http_server: tuple[Served, str], tmp_path: Path
) -> None:
    """The README's OpenAI SDK and LangChain example prints what its comments say, and
    its curl call prints the line shown under it."""
    served, port = http_server
    _, example, shell, connect = readme_blocks("http")
    address = f"127.0.0.1:{HTTP_PORT}"
    for block in (example, shell, connect):
        assert address in block.code
    script = tmp_path / "doors.py"
    script.write_text(example.code.replace(address, f"127.0.0.1:{port}"))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    shown = [
        line.rsplit("#", 1)[1].strip() for line in example.code.splitlines() if "print(" in line
    ]
    assert done.stdout.split("\n")[: len(shown)] == shown
    _run_steps(
        Block(shell.scenario, shell.language, shell.code.replace(address, f"127.0.0.1:{port}"), 0),
        served.target,
        dict(os.environ),
    )
    # The TypeScript example, bundled from where its imports resolve (the TypeScript
    # client's folder) and run by Node.js, whose fetch connect-web uses as a browser would.
    assert connect.language == "ts"
    bundle = tmp_path / "connect.mjs"
    subprocess.run(
        [
            str(TYPESCRIPT / "node_modules" / ".bin" / "esbuild"),
            "--bundle",
            "--format=esm",
            "--platform=node",
            "--loader=ts",
            "--sourcefile=readme.ts",
            f"--outfile={bundle}",
        ],
        input=connect.code.replace(address, f"127.0.0.1:{port}"),
        cwd=TYPESCRIPT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ran = subprocess.run(
        ["node", str(bundle)], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    shown = [
        line.rsplit("//", 1)[1].strip() for line in connect.code.splitlines() if "log(" in line
    ]
    assert ran.stdout.splitlines() == shown
