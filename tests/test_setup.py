"""scripts/setup, the set-up behind both README commands, on a machine that lacks a
package and may not install it: it stops at once, before changing anything, with the
exact command to run. (On a machine where it may install, CI's fresh machines are the
test: `make test` there starts without Go, redis-server, h2load, Chromium or
Prometheus.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What scripts/setup test looks for, each present here (CI installed them).
PRESENT = (
    "node",
    "npm",
    "redis-server",
    "chromium",
    "prometheus",
    "go",
    "protoc-gen-go",
    "protoc-gen-go-grpc",
    "dpkg-query",
)
# What it runs before it gets to them.
USED = ("dirname",)
NOBODY = 65534


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A folder with scripts/setup in it, readable by an unprivileged user."""
    where = Path(tempfile.mkdtemp(prefix="embedgate-setup-"))
    (where / "scripts").mkdir()
    shutil.copy(REPO / "scripts/setup", where / "scripts/setup")
    # Readable by the unprivileged user the script runs as.
    os.chmod(where, 0o755)  # noqa: S103 - a temporary folder with no secret in it
    os.chmod(where / "scripts", 0o755)  # noqa: S103 - the same
    yield where
    shutil.rmtree(where)


def _path_without(folder: Path, *missing: str, apt: bool = True) -> str:
    """A PATH holding the tools scripts/setup looks for, but ``missing`` (and sudo), and
    a stand-in python3 that reports 3.11."""
    folder.mkdir(mode=0o755)
    for name in (*USED, *PRESENT, *(("apt-get",) if apt else ())):
        if name in missing:
            continue
        found = shutil.which(name)
        assert found, f"{name} is missing here (scripts/setup test installs it)"
        (folder / name).symlink_to(found)
    python = folder / "python3"
    python.write_text("#!/bin/sh\necho 3.11\n")
    python.chmod(0o755)
    return str(folder)


def _setup_as_unprivileged(checkout: Path, path: str) -> subprocess.CompletedProcess[str]:
    """`scripts/setup test` as a user who is not root and has no sudo."""
    bash = shutil.which("bash")
    assert bash
    command = [bash, str(checkout / "scripts/setup"), "test"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is missing"
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(
        command,
        env={"PATH": path, "HOME": str(checkout), "PYTHON": f"{path}/python3"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_package_stops_with_the_exact_command(checkout: Path) -> None:
    """h2load missing, apt-get present, no root and no sudo: exit 1 at once, naming the
    Debian package and the command that installs it, with nothing created."""
    path = _path_without(checkout / "bin", "h2load")
    done = _setup_as_unprivileged(checkout, path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "setup: missing: nghttp2-client. Run:  sudo apt-get update && "
        "sudo apt-get install -y --no-install-recommends nghttp2-client"
    )
    assert not (checkout / ".venv").exists()


def test_without_apt_it_names_the_packages(checkout: Path) -> None:
    """No apt-get at all (not Debian or Ubuntu): exit 1 naming what is missing."""
    path = _path_without(checkout / "bin", "h2load", "redis-server", apt=False)
    done = _setup_as_unprivileged(checkout, path)
    assert done.returncode == 1, done.stderr
    assert "missing: redis-server nghttp2-client (Debian/Ubuntu package names)" in done.stderr
    assert not (checkout / ".venv").exists()
