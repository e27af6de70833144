"""The server's layers, pinned by reading every module's imports.

From the top: the edge (the gRPC contract), routing, the providers, and the bottom
modules every layer shares. Imports flow downward only; the contract's code (grpc,
protobuf, ``embedgate.v1``) is known to the edge alone, and the composition modules
(``app``, ``cli``) may use everything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "server" / "embedgate" / "server"
PREFIX = "embedgate.server."

BOTTOM = {"config", "domain", "errors", "deadlines", "logs", "health"}
# Services every layer above may use, each resting on the bottom alone: the
# instruments, the quota windows, and the traces.
SERVICES = {"metrics", "quotas", "tracing"}
# Which parts of the server each layer may import (a part is a module of the bottom,
# a service, or a package: edge, routing, providers).
ALLOWED: dict[str, set[str]] = {
    "bottom": BOTTOM,
    "service": BOTTOM,
    "providers": BOTTOM | SERVICES | {"providers"},
    "routing": BOTTOM | SERVICES | {"providers", "routing"},
    "edge": BOTTOM | SERVICES | {"routing", "edge"},
    "composition": BOTTOM | SERVICES | {"providers", "routing", "edge", "app", "cli"},
}
# What only the edge (and the composition modules) may import: the wire contract.
CONTRACT = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "google.protobuf",
    "google.rpc",
    "embedgate.v1",
)


def layer_of(module: Path) -> str:
    relative = module.relative_to(PACKAGE)
    if len(relative.parts) > 1:
        return relative.parts[0]
    name = relative.stem
    if name in BOTTOM:
        return "bottom"
    if name in SERVICES:
        return "service"
    return "composition"  # app, cli, __init__


def imports_of(module: Path) -> Iterator[tuple[int, str]]:
    """Every module ``module`` imports, at any depth of its code, with the line."""
    tree = ast.parse(module.read_text(encoding="utf-8"), str(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "embedgate.server":  # `from embedgate.server import config`
                for alias in node.names:
                    yield node.lineno, f"{PREFIX}{alias.name}"
            else:
                yield node.lineno, node.module


def part_of(imported: str) -> str | None:
    """``embedgate.server.routing.cache`` → ``routing``; None for other packages."""
    if not imported.startswith(PREFIX):
        return None
    return imported.removeprefix(PREFIX).split(".")[0]


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: str(m.relative_to(PACKAGE)))
def test_imports_flow_down_and_the_contract_stays_at_the_edge(module: Path) -> None:
    """A module imports only from its own layer and the layers below it; only the edge
    and the composition modules import grpc, protobuf or the generated contract."""
    layer = layer_of(module)
    wrong = []
    for line, imported in imports_of(module):
        part = part_of(imported)
        if part is not None and part not in ALLOWED[layer]:
            wrong.append(f"line {line}: {imported} (a {layer} module)")
        contract = any(imported == c or imported.startswith(c + ".") for c in CONTRACT)
        if contract and layer not in ("edge", "composition"):
            wrong.append(f"line {line}: {imported} belongs to the edge")
    assert wrong == []


def test_the_layer_rules_see_every_layer() -> None:
    """The walk finds modules in every layer, and finds an import that breaks a rule
    when there is one (the rules can fail)."""
    layers = {layer_of(module) for module in MODULES}
    assert layers == {"bottom", "service", "providers", "routing", "edge", "composition"}
    service = PACKAGE / "edge" / "service.py"
    assert any(part_of(name) == "routing" for _, name in imports_of(service))
    assert "routing" not in ALLOWED["providers"]
    assert "edge" not in ALLOWED["routing"]
