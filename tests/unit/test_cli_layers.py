"""The ``hostmaint`` program is assembled from three layers (hostmaint_cli/__init__.py): the core's
commands, the commands that start flows, the Prefect server's. These tests keep the seams honest."""

from __future__ import annotations

import os
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


def test_a_run_that_changes_hosts_is_refused_before_it_starts_when_no_server_is_configured(tmp_path: Path) -> None:
    """Without PREFECT_API_URL Prefect would start a temporary server holding none of hostmaint's locks; the
    run used to fail there, 20 s later, with 'the Prefect server None'. Nothing may start, every host as it was."""
    from hostmaint.simulated_fleet import SimulatedFleet, demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap))
    before = SimulatedFleet.load(inventory.parent / "fleet-state.json").running
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HOSTMAINT_DB=str(tmp_path / "hm.db"), PREFECT_HOME=str(tmp_path / "prefect"))
    # what each can do without one: --dry-run only where the command has it ('window run' and 'host return'
    # were told "--dry-run needs no server", and have no --dry-run)
    for argv, without in ((["patch", "hv01"], "--dry-run needs no server"),
                          (["evacuate", "hv02"], "--dry-run needs no server"),
                          (["window", "run", "demo"], "'hostmaint plan window demo' shows the window's plan"),
                          (["rebalance", "demo"], "--dry-run needs no server"),
                          (["host", "return", "hv01"], None)):
        done = subprocess.run([sys.executable, "-m", "hostmaint_cli", *argv, "-i", str(inventory)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2, (argv, done.stdout[-500:], said[-1000:])
        assert "no Prefect server is configured (PREFECT_API_URL is not set)" in said and "hostmaint server" in said
        assert "Starting temporary server" not in done.stdout + done.stderr, argv
        assert (without in said) if without else "dry-run" not in said, (argv, said[-500:])
        help_text = subprocess.run([sys.executable, "-m", "hostmaint_cli", *argv[:-1], "--help"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=120).stdout
        assert ("--dry-run" in help_text) == (without == "--dry-run needs no server"), argv
    assert SimulatedFleet.load(inventory.parent / "fleet-state.json").running == before
    assert not list((tmp_path / "prefect").glob("*.db"))  # no temporary server ever made its database


def test_the_program_turns_off_prefect_analytics_unless_the_operator_set_it() -> None:
    # a temporary server (a dry run without PREFECT_API_URL) would otherwise report usage to Prefect
    script = ("import hostmaint_cli.main\n"
              "from prefect.settings import get_current_settings\n"
              "print(get_current_settings().server.analytics_enabled)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    off = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    on = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "true"})
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True"), off.stderr[-1000:] + on.stderr[-1000:]
