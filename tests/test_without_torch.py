"""The run without torch (tests/without_torch.py, EMBEDGATE_TEST_WITHOUT_TORCH=1) is what
it claims: once blocked, torch and the [local] extra's packages cannot be imported, in the
process or in a Python process it starts, even where they are installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import without_torch

# Tries to import each name given; run as `block STUBS NAMES...`, it blocks first, then
# runs itself as `try NAMES...` in a child. Prints what could be imported.
SCRIPT = """
import importlib, subprocess, sys
from pathlib import Path

import without_torch

mode, *rest = sys.argv[1:]
if mode == "block":
    stubs, *names = rest
    without_torch.block(Path(stubs))
    subprocess.run([sys.executable, sys.argv[0], "try", *names], check=True)
else:
    names = rest
found = []
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    found.append(name)
print(mode, "imported:", " ".join(found) or "nothing")
"""


def test_blocked_packages_cannot_be_imported_here_or_in_a_child(tmp_path: Path) -> None:
    """After block(): every blocked package, and a module inside one, fails to import
    with ModuleNotFoundError, in that process and in a Python process it then starts."""
    script = tmp_path / "imports.py"
    script.write_text(SCRIPT)
    names = [*without_torch.BLOCKED, "torch.nn", "sentence_transformers.models"]
    done = subprocess.run(
        [sys.executable, str(script), "block", str(tmp_path / "stubs"), *names],
        env=with_tests_on_path(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["try imported: nothing", "block imported: nothing"]


def with_tests_on_path() -> dict[str, str]:
    """This environment, with tests/ first on PYTHONPATH (for without_torch)."""
    tests = str(Path(__file__).resolve().parent)
    inherited = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *filter(None, [inherited])])}


def test_a_package_imported_before_the_block_stops_the_run(tmp_path: Path) -> None:
    """block() refuses to start when a blocked package is already imported: the run
    would not be without it."""
    code = (
        "import sys, types\nfrom pathlib import Path\nimport without_torch\n"
        "sys.modules['torch'] = types.ModuleType('torch')\n"
        "try:\n    without_torch.block(Path(sys.argv[1]))\n"
        "except RuntimeError as error:\n    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "stubs")],
        env=with_tests_on_path(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"{without_torch.ENV}: imported before they could be blocked: torch"
    )
