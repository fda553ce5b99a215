"""The ``hostmaint`` program is assembled from three layers (hostmaint_cli/__init__.py): the core's
commands, the commands that start flows, the Prefect server's. These tests keep the seams honest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def _tree(command: Any, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command path under a click group (a group's own path included)."""
    paths = {path}
    for name, sub in getattr(command, "commands", {}).items():
        paths |= _tree(sub, (*path, name))
    return paths


def _layers() -> list[typer.Typer]:
    from deployments import cli as server_commands
    from hostmaint import cli as core_commands
    from hostmaint_cli import runs

    return [core_commands.app, runs.app, server_commands.app]


def _leaves(app: typer.Typer) -> set[tuple[str, ...]]:
    tree = _tree(typer.main.get_command(app))
    return {p for p in tree if not any(q[:len(p)] == p and q != p for q in tree)}


def test_the_program_has_every_layers_commands_and_no_layer_shadows_another() -> None:
    from hostmaint_cli.main import app

    leaves = [_leaves(layer) for layer in _layers()]
    for i, mine in enumerate(leaves):
        for theirs in leaves[i + 1:]:
            assert not mine & theirs, f"a command defined by two layers: {sorted(mine & theirs)}"
    program = _leaves(app)
    assert program == set().union(*leaves)
    # a group two layers fill is one group: the core's host commands beside the flow's
    assert {("host", "status"), ("host", "return"), ("plan", "drain"), ("window", "run"), ("setup",)} <= program


def test_the_core_app_is_left_as_the_core_declared_it() -> None:
    from hostmaint.cli import app as core
    from hostmaint_cli.main import app  # noqa: F401  (assembling must not add to the core's groups)

    core_leaves = _leaves(core)
    assert ("host", "status") in core_leaves
    assert not {("host", "return"), ("patch",), ("demo",), ("window", "run"), ("setup",)} & core_leaves


@pytest.mark.parametrize("argv", [["--help"], ["host", "--help"], ["plan", "drain", "--help"]])
def test_the_program_answers_help(argv: list[str]) -> None:
    from hostmaint_cli.main import app

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output


def test_the_core_commands_run_without_importing_prefect(tmp_path: Path) -> None:
    """Not only no import statement (test_core_has_no_prefect): nothing they load pulls Prefect in."""
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from hostmaint.cli import app\n"
        "for argv in (['--help'], ['plan', 'drain', '--help'], ['inventory', 'check', '--no-files', sys.argv[1]]):\n"
        "    result = CliRunner().invoke(app, argv)\n"
        "    assert result.exit_code == 0, (argv, result.output)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('prefect', 'flows', 'tasks', 'deployments', 'hostmaint_cli'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "examples" / "inventory.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_program_starts_without_the_http_client() -> None:
    """httpx is for the commands that call the Prefect API; loaded at the start, every command of the
    program (a plan, a lab command) paid for it, 0.1-0.5 s on this machine."""
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from hostmaint_cli.main import app\n"
        "for argv in (['--help'], ['plan', 'drain', '--help'], ['server', '--help']):\n"
        "    result = CliRunner().invoke(app, argv)\n"
        "    assert result.exit_code == 0, (argv, result.output)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'prefect'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
