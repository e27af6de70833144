"""Rules for the tests themselves, and the benchmark: each test says what rule it checks,
and none depends on a file outside the repository (a path that climbs out of it, or an
absolute path into someone's machine), which would pass on one machine only."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    path
    for folder in ("tests", "bench")
    for path in (REPO / folder).rglob("*")
    if path.is_file() and "__pycache__" not in path.parts
)
PYTHON = [path for path in SOURCES if path.suffix == ".py"]
# A path that climbs out (a parent reference, `..` then a slash), or an absolute one into a
# home, workspace or scratch folder.
OUTSIDE = re.compile(r"(?<![\w.])\.\./|(?<![\w.:/])/(?:home|Users|root|work|mnt|media|srv|tmp)/")


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


def test_no_file_outside_the_repository_is_named() -> None:
    """No test or benchmark file names a path outside the repository: none climbs out
    through a parent reference (`..`), none is absolute into a home, workspace or
    temporary folder (a test makes its files under tmp_path), and no `Path(__file__)`
    climbs above the root."""
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [
            f"{relative(path)}:{text.count(chr(10), 0, match.start()) + 1} {match[0]!r}"
            for match in OUTSIDE.finditer(text)
        ]
        if path.suffix == ".py":
            found += [f"{relative(path)}:{where}" for where in climbs_out(path, ast.parse(text))]
    assert SOURCES
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def climbs_out(path: Path, tree: ast.Module) -> list[str]:
    """A bare `..`, and `Path(__file__)...parents[n]` or `.parent` chains that leave the
    repository."""
    # How many `.parent` steps lead from the file to the root.
    steps = len(path.relative_to(REPO).parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == os.pardir:
            found.append(f"{node.lineno} {node.value!r}")
        if not isinstance(node, ast.Subscript | ast.Attribute) or "__file__" not in ast.unparse(
            node
        ):
            continue
        chain = 0
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute) and inner.attr == "parent":
            chain, inner = chain + 1, inner.value
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
        ):
            chain = node.slice.value + 1
        if chain > steps:
            found.append(f"{node.lineno} {ast.unparse(node)}")
    return found
