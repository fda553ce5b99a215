"""The layering of docs/architecture.md, read from every module's imports (the AST: imports inside
functions and under TYPE_CHECKING count too). Nothing is exempt: a rule that is wrong is changed here
and in docs/architecture.md together."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hostmaint", "tasks", "flows", "deployments", "hostmaint_cli", "benchmarks")
OURS = (*PACKAGES, "tests")
EVERYTHING = OURS


@dataclass(frozen=True)
class Layer:
    name: str
    may_import: tuple[str, ...]  # of ours; a name covers its submodules
    may_not_import: tuple[str, ...] = ()  # carved out of may_import
    prefect: bool = False


CORE_BASICS = ("hostmaint.models", "hostmaint.errors", "hostmaint.display", "hostmaint.bulk")  # models need bulk
# the most specific layer a module belongs to wins (longest prefix)
LAYERS = {layer.name: layer for layer in (
    Layer("hostmaint.placement", ("hostmaint.placement", *CORE_BASICS)),
    Layer("hostmaint.drivers", ("hostmaint.drivers", *CORE_BASICS, "hostmaint.inventory", "hostmaint.rpm_version",
                                "hostmaint.migration.policy")),
    Layer("hostmaint.migration", ("hostmaint.migration", "hostmaint.placement", *CORE_BASICS, "hostmaint.inventory",
                                  "hostmaint.drivers.base")),
    Layer("hostmaint", ("hostmaint",), may_not_import=("hostmaint.lab",)),
    Layer("hostmaint.cli", ("hostmaint",)),
    Layer("hostmaint.lab", ("hostmaint",)),
    Layer("tasks", ("hostmaint", "tasks"), prefect=True),
    Layer("flows", ("hostmaint", "tasks", "flows"), prefect=True),
    Layer("deployments", ("hostmaint", "tasks", "flows", "deployments"), prefect=True),
    Layer("hostmaint_cli", ("hostmaint", "tasks", "flows", "deployments", "hostmaint_cli"), prefect=True),
    Layer("benchmarks", EVERYTHING, prefect=True),
)}
# third-party libraries kept in one place: (library, the modules that may import it)
VENDORS = (("libvirt", ("hostmaint.drivers.libvirt", "hostmaint.lab", "benchmarks")),
           ("paramiko", ("hostmaint.drivers.ssh",)))
PREFECT_PRIVATE_ADAPTER = "tasks.prefect_private"


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_of(module: str) -> Layer:
    return max((layer for name, layer in LAYERS.items() if _within(module, name)), key=lambda layer: len(layer.name))


@dataclass(frozen=True)
class Import:
    module: str  # what is imported (absolute)
    line: int


def _imports(path: Path) -> list[Import]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(Import(name, node.lineno))
            if _is_ours(name):  # "from hostmaint import cli" imports hostmaint.cli
                found += [Import(f"{name}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return found


def _is_ours(name: str) -> bool:
    return name.split(".")[0] in OURS


FILES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _existing_module(name: str) -> bool:
    """Whether ``name`` is one of our modules or packages (``from hostmaint import x`` names either)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    layer = _layer_of(module)
    problems = []
    for imp in _imports(path):
        name, where = imp.module, f"{path.relative_to(ROOT)}:{imp.line}"
        top = name.split(".")[0]
        if _is_ours(name):
            if not _existing_module(name):
                continue  # a name imported from a module (a function, a class): its module is checked
            allowed = any(_within(name, p) for p in layer.may_import) and \
                not any(_within(name, p) for p in layer.may_not_import)
            if not allowed and not _within(name, module):
                problems.append(f"{where}: {module} ({layer.name}) imports {name}")
        elif top == "prefect":
            if not layer.prefect:
                problems.append(f"{where}: {module} ({layer.name}) imports {name}: the core knows no Prefect")
            elif any(part.startswith("_") for part in name.split(".")[1:]) and module != PREFECT_PRIVATE_ADAPTER:
                problems.append(f"{where}: {module} imports Prefect's private {name}: only "
                                f"{PREFECT_PRIVATE_ADAPTER} may (and its contract test pins what it uses)")
        for vendor, owners in VENDORS:
            if top == vendor and not any(_within(module, owner) for owner in owners):
                problems.append(f"{where}: {module} imports {vendor}: only {', '.join(owners)} may")
    return problems


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_imports_only_what_its_layer_may(path: Path) -> None:
    problems = _violations(path)
    assert not problems, "\n".join(problems) + "\n(docs/architecture.md)"


def test_no_private_prefect_keyword_outside_the_adapter() -> None:
    """Prefect's private keywords (Secret.load's ``_sync``) are passed by the adapter only (the core
    cannot call Prefect: its own keyword-only fields may start with ``_``)."""
    offenders = []
    for path in FILES:
        module = _module_name(path)
        if module == PREFECT_PRIVATE_ADAPTER or not _layer_of(module).prefect:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {k.arg}=" for k in node.keywords
                              if k.arg and k.arg.startswith("_")]
    assert not offenders, offenders


def test_every_package_has_a_layer_and_the_rules_see_imports() -> None:
    """Not vacuous: each layer has modules, and they import something of ours."""
    for name in LAYERS:
        modules = [p for p in FILES if _layer_of(_module_name(p)).name == name]
        assert modules, f"no module is in layer {name}"
        assert any(_is_ours(i.module) for p in modules for i in _imports(p)), f"{name} imports nothing of ours"


@pytest.mark.parametrize("module,imported,allowed", [
    ("hostmaint.placement.fit", "hostmaint.maintenance", False),
    ("hostmaint.placement.fit", "hostmaint.models", True),
    ("hostmaint.drivers.ssh", "hostmaint.migration.policy", True),
    ("hostmaint.drivers.ssh", "hostmaint.migration.drain", False),
    ("hostmaint.maintenance", "hostmaint.lab", False),
    ("hostmaint.cli", "hostmaint.lab", True),
    ("hostmaint.cli", "flows.patch_host", False),
    ("tasks.common", "flows.locks", False),
    ("flows.locks", "tasks.prefect_private", True),
    ("flows.locks", "deployments.serve", False),
    ("deployments.cli", "hostmaint_cli.runs", False),
    ("hostmaint_cli.main", "deployments.cli", True),
])
def test_the_rules_read_as_the_doc_says(module: str, imported: str, allowed: bool) -> None:
    layer = _layer_of(module)
    verdict = any(_within(imported, p) for p in layer.may_import) and \
        not any(_within(imported, p) for p in layer.may_not_import)
    assert verdict is allowed
