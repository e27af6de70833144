"""The LiteLLM proxy as a case: another gateway, in front of the same fake vendor.

The bench installs ``litellm[proxy]`` from the package index into a virtualenv of its
own (``build/litellm-venv``, which git ignores), once; a machine that cannot install it
skips the case with a note that says why. It runs as its documentation starts it
(``litellm --config``), one worker, with a master key (it refuses to start without
one), and without reaching for the network: offline mode keeps the model cost map it
would fetch at start-up to the copy in the package. Its one model is the fake vendor
as an OpenAI-compatible embedding model; h2load sends the direct case's request body
to its ``POST /v1/embeddings`` over HTTP/1.1, with the key.
"""

from __future__ import annotations

import base64
import http.client
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import yaml

from bench.gateway import VENDOR_MODEL, free_port
from bench.procs import REPO, BenchError, Child, pinned, wait_until

VENV = REPO / "build" / "litellm-venv"
SPEC = "litellm[proxy]"
INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 180
# Its documented switches for an air-gapped proxy: no model cost map from the network.
OFFLINE = {"LITELLM_OFFLINE_MODE": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


class UnavailableError(Exception):
    """LiteLLM cannot be installed or started here: the case is skipped, with this note."""


def installed_version(venv: Path = VENV) -> str | None:
    """The LiteLLM version in ``venv``, or None when it is not installed there."""
    if not (venv / "bin" / "litellm").exists():
        return None
    done = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from importlib.metadata import version; print(version('litellm'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_installed(venv: Path = VENV, pip_args: Sequence[str] = ()) -> str:
    """Install LiteLLM into ``venv`` unless it is there; its version. ``pip_args`` go to
    pip (the tests point it at no index to see the skip). Raises ``UnavailableError``."""
    version = installed_version(venv)
    if version is not None:
        return version
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pip_args, SPEC],
    ]
    for step in steps:
        try:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise UnavailableError(
                f"`{SPEC}` did not install within {INSTALL_TIMEOUT_S} s: case skipped"
            ) from None
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            why = (errors or done.stderr.strip().splitlines() or ["no message"])[-1]
            raise UnavailableError(
                f"`{SPEC}` could not be installed from the package index into "
                f"{venv.relative_to(REPO) if venv.is_relative_to(REPO) else venv} "
                f"(no network?): {why.strip()}; case skipped"
            )
    version = installed_version(venv)
    if version is None:
        raise UnavailableError(f"`{SPEC}` installed, but its `litellm` command does not run")
    return version


def proxy_config(vendor_port: int) -> dict[str, object]:
    return {
        "model_list": [
            {
                "model_name": VENDOR_MODEL,
                "litellm_params": {
                    "model": f"openai/{VENDOR_MODEL}",
                    "api_base": f"http://127.0.0.1:{vendor_port}/v1",
                    "api_key": "unused",
                },
            }
        ]
    }


def start(
    name: str, vendor_port: int, core: int | None, work_dir: Path, venv: Path = VENV
) -> tuple[Child, int, str]:
    """Start the proxy with one worker; its process, port and master key, once it says
    it is alive."""
    port, key = free_port(), "sk-" + secrets.token_hex(16)
    config = work_dir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(proxy_config(vendor_port), sort_keys=False))
    command = [
        str(venv / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {**OFFLINE, "LITELLM_MASTER_KEY": key}
    child = Child(name, pinned(command, core), work_dir, env=env, stdout_to_log=True)
    try:
        alive = wait_until(lambda: _alive(child, port), START_TIMEOUT_S, interval_s=0.5)
        if not alive:
            raise child.fail(f"not answering /health/liveliness within {START_TIMEOUT_S} s")
    except BaseException:
        child.stop()
        raise
    return child, port, key


def _alive(child: Child, port: int) -> bool:
    child.check_alive()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health/liveliness")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def check(port: int, key: str, body: bytes, dims: int) -> None:
    """One embeddings request through the proxy: a 200 with one vector of ``dims``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        connection.request("POST", "/v1/embeddings", body, headers)
        reply = connection.getresponse()
        raw = reply.read()
    finally:
        connection.close()
    if reply.status != 200:
        raise BenchError(f"LiteLLM answered {reply.status}: {raw[:300]!r}")
    embedding = orjson.loads(raw)["data"][0]["embedding"]
    size = len(base64.b64decode(embedding)) // 4 if isinstance(embedding, str) else len(embedding)
    if size != dims:
        raise BenchError(f"LiteLLM gave a vector of {size} values, expected {dims}")
