"""The core library must not import Prefect: the planner and drivers are tested without it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "hostmaint"
# The CLI is the top layer: it may start flows. Everything else is the core.
TOP_LAYER = {CORE / "cli.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


CORE_FILES = sorted(p for p in CORE.rglob("*.py") if p not in TOP_LAYER)


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_does_not_import_prefect(path: Path) -> None:
    bad = {n for n in _imports(path) if n == "prefect" or n.startswith("prefect.")
           or n.startswith(("flows", "tasks"))}
    assert not bad, f"{path} imports {sorted(bad)}"


@pytest.mark.parametrize("vendor,allowed", [("libvirt", "drivers/libvirt.py"), ("paramiko", "drivers/ssh.py")])
def test_vendor_libraries_stay_in_their_driver(vendor: str, allowed: str) -> None:
    offenders = [str(p.relative_to(CORE)) for p in CORE_FILES
                 if any(n == vendor or n.startswith(vendor + ".") for n in _imports(p))
                 and str(p.relative_to(CORE)) != allowed and "lab/" not in str(p.relative_to(CORE))]
    assert not offenders, f"{vendor} imported outside {allowed}: {offenders}"
