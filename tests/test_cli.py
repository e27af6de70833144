"""The `embedgate` command for people: embed, rerank and models against the real server."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import pytest
from conftest import (
    MULTI,
    PNG_1X1,
    TEXT_ONLY,
    WIDE,
    ScriptedProvider,
    Served,
    ranking,
    server_settings,
)

from embedgate.client.cli import build_parser
from embedgate.server.edge.server import Gateway
from embedgate.server.routing.router import Router


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedgate.client.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_embed_prints_a_summary(served: Served) -> None:
    """`embedgate embed --text` prints dimension, norm and first values per input."""
    code, out, err = await run_cli(
        "embed", "--target", served.target, "--model", TEXT_ONLY, "--text", "two apples"
    )
    assert code == 0, err
    assert 'text "two apples": 384 dims, norm 1.0000, [' in out
    assert f"model {TEXT_ONLY}" in out


async def test_embed_json_prints_the_whole_response(served: Served) -> None:
    """`--json` prints the response message as JSON, every value included."""
    code, out, err = await run_cli(
        "embed",
        "--target",
        served.target,
        "--model",
        TEXT_ONLY,
        "--text",
        "a",
        "--text",
        "b",
        "--dimensions",
        "32",
        "--json",
    )
    assert code == 0, err
    body = json.loads(out)
    assert body["model"] == TEXT_ONLY
    assert [len(e["values"]) for e in body["embeddings"]] == [32, 32]


async def test_embed_images_and_video_frames(served: Served, tmp_path: Path) -> None:
    """--image-uri, --image-file and repeated --video-frame become inputs in that order."""
    picture = tmp_path / "dot.png"
    picture.write_bytes(PNG_1X1)
    code, out, err = await run_cli(
        "embed",
        "--target",
        served.target,
        "--model",
        MULTI,
        "--image-uri",
        "https://example.test/cat.png",
        "--image-file",
        str(picture),
        "--video-frame",
        str(picture),
        "--video-frame",
        "https://example.test/f.png",
    )
    assert code == 0, err
    lines = [line.strip() for line in out.splitlines() if "dims" in line]
    assert lines[0].startswith("image https://example.test/cat.png: 16 dims")
    assert lines[1].startswith(f"image ({len(PNG_1X1)} bytes): 16 dims")
    assert lines[2].startswith("video (2 frames): 16 dims")


async def test_embed_errors_print_the_field_violations(served: Served) -> None:
    """A rejected request exits 1 and prints the code, reason and each bad field."""
    code, _, err = await run_cli(
        "embed", "--target", served.target, "--model", TEXT_ONLY, "--image-uri", "ftp://x/y.png"
    )
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "inputs[0].image.uri: must be an absolute http or https URL" in err


async def test_models_lists_the_models(served: Served) -> None:
    """`embedgate models` prints one line per model; --json gives the fields."""
    code, out, err = await run_cli("models", "--target", served.target)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"{TEXT_ONLY}  provider=test  inputs=text  dims=384")
    code, out, err = await run_cli("models", "--target", served.target, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["name"] == TEXT_ONLY


async def test_rerank_prints_documents_best_first(served: Served) -> None:
    """`embedgate rerank` prints the documents best first, each with its index."""
    documents = ["quarterly stock market report", "a pair of apples", "the weather in Oslo"]
    best_first = ranking(served.text, "two apples", documents)
    assert best_first != sorted(best_first), "documents already in order prove nothing"
    code, out, err = await run_cli(
        "rerank",
        "--target",
        served.target,
        "--query",
        "two apples",
        *(word for document in documents for word in ("--document", document)),
    )
    assert code == 0, err
    ranked = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(ranked) == len(documents)
    for line, index in zip(ranked, best_first, strict=True):
        assert line.endswith(f"[{index}] {documents[index]}")


async def test_unreachable_server_is_a_clear_error() -> None:
    """A server that is not there gives UNAVAILABLE and exit 1, not a traceback."""
    code, _, err = await run_cli("models", "--target", "127.0.0.1:1", "--timeout", "3")
    assert code == 1
    assert "UNAVAILABLE" in err
    assert "Traceback" not in err


async def test_health_exits_0_when_serving(served: Served) -> None:
    """`embedgate health` prints SERVING and exits 0 against a serving server, and exits 1
    for a service the server does not know."""
    code, out, err = await run_cli("health", "--target", served.target)
    assert (code, out.strip()) == (0, "SERVING"), err
    code, _, err = await run_cli("health", "--target", served.target, "--service", "x.v1.Nope")
    assert code == 1
    assert "NOT_FOUND" in err


async def test_embed_without_a_model_uses_the_only_one() -> None:
    """Without --model, `embed` asks ListModels: the one model that embeds is used."""
    gateway = Gateway(Router([ScriptedProvider("only", dims=8)]), server_settings())
    port = await gateway.start()
    try:
        code, out, err = await run_cli("embed", "--target", f"127.0.0.1:{port}", "--text", "a")
    finally:
        await gateway.stop(grace=0)
    assert code == 0, err
    assert out.startswith("model only, request ")
    assert 'text "a": 8 dims' in out


async def test_embed_without_a_model_names_the_choices(served: Served) -> None:
    """With several models and no --model, `embed` exits non-zero naming them all."""
    code, _, err = await run_cli("embed", "--target", served.target, "--text", "a")
    assert code == 1
    assert f"choose one with --model: {TEXT_ONLY}, {MULTI}, {WIDE}" in err


@pytest.mark.parametrize(
    ("output_type", "shown"),
    [
        ("int8", "384 dims as int8, ["),
        ("uint8", "384 dims as uint8, ["),
        ("float16", "384 dims as float16, ["),
        ("ubinary", "48 bytes of ubinary bits, ["),
    ],
)
async def test_embed_output_type(served: Served, output_type: str, shown: str) -> None:
    """--output-type asks for a compact type and the summary reads it as that type."""
    code, out, err = await run_cli(
        "embed", "--target", served.target, "--model", TEXT_ONLY, "--text", "a",
        "--output-type", output_type,
    )  # fmt: skip
    assert code == 0, err
    assert shown in out


def test_every_option_has_help_text() -> None:
    """Every option of every command explains itself in --help."""
    parser = build_parser()
    commands = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands += list(action.choices.values())
    missing = [
        f"{command.prog} {'/'.join(action.option_strings)}"
        for command in commands
        for action in command._actions
        if action.option_strings and not action.help
    ]
    assert len(commands) == 8  # embedgate, serve, check, usage, embed, rerank, models, health
    assert missing == []


async def test_version() -> None:
    """`embedgate --version` names the distribution that gives the command."""
    code, out, _ = await run_cli("--version")
    assert code == 0
    assert out.strip() == "embedgate 0.1.0 (server and client)"
