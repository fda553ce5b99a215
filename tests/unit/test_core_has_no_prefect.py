"""The core library must not import Prefect: the planner and drivers are tested without it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "hostmaint"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


CORE_FILES = sorted(CORE.rglob("*.py"))  # every one, the core's commands (cli.py) too


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_does_not_import_prefect(path: Path) -> None:
    upper = ("prefect", "flows", "tasks", "deployments", "hostmaint_cli")
    bad = {n for n in _imports(path) if n.split(".")[0] in upper}
    assert not bad, f"{path} imports {sorted(bad)}"


@pytest.mark.parametrize("vendor,allowed", [("libvirt", "drivers/libvirt/"), ("paramiko", "drivers/ssh.py")])
def test_vendor_libraries_stay_in_their_driver(vendor: str, allowed: str) -> None:
    offenders = [str(p.relative_to(CORE)) for p in CORE_FILES
                 if any(n == vendor or n.startswith(vendor + ".") for n in _imports(p))
                 and not str(p.relative_to(CORE)).startswith(allowed) and "lab/" not in str(p.relative_to(CORE))]
    assert not offenders, f"{vendor} imported outside {allowed}: {offenders}"
