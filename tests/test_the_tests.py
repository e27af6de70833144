"""Rules for the tests themselves: each test says what rule it checks."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sorted(path for path in (REPO / "tests").rglob("*.py") if "__pycache__" not in path.parts)


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_test_states_its_rule() -> None:
    """Each test function has a docstring: the rule it checks, in a sentence or two."""
    silent = [
        f"{relative(path)}:{node.lineno} {node.name}"
        for path in PYTHON
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
        and not ast.get_docstring(node)
    ]
    assert not silent, "tests without a docstring:\n" + "\n".join(silent)
