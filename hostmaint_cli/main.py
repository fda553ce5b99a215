"""The ``hostmaint`` program: the core's commands, the commands that start flows and the Prefect
server's, in one command line (see ``hostmaint_cli/__init__.py`` for where a command goes)."""

from __future__ import annotations

import os

# Before Prefect is imported anywhere: a temporary server Prefect starts for this process (a dry run
# without PREFECT_API_URL) must not report usage to Prefect's analytics, as 'hostmaint server' does not.
# An operator who wants it sets the variable.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import copy
from collections.abc import Sequence

import typer
from typer.models import TyperInfo

from deployments import cli as server_commands
from hostmaint import cli as core_commands
from hostmaint_cli import runs


def assemble(layers: Sequence[typer.Typer], *, help: str) -> typer.Typer:
    """One app holding every layer's commands; groups of the same name across layers become one group.

    The layers' apps are left as they are (the core's ``hostmaint.cli.app`` keeps only its own commands).
    A command name given by two layers is refused by a test (tests/unit/test_cli_layers.py), not here:
    this runs at every start.
    """
    app = typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    _merge_into(app, layers)
    return app


def _merge_into(target: typer.Typer, layers: Sequence[typer.Typer]) -> None:
    groups: dict[str | None, list[tuple[TyperInfo, typer.Typer]]] = {}
    for layer in layers:
        target.registered_commands.extend(layer.registered_commands)
        for group in layer.registered_groups:
            assert group.typer_instance is not None  # add_typer always gives one
            groups.setdefault(group.name, []).append((group, group.typer_instance))
    for same_name in groups.values():
        if len(same_name) == 1:
            target.registered_groups.append(same_name[0][0])
            continue
        first, first_app = same_name[0]
        merged = typer.Typer()
        merged.info = copy.copy(first_app.info)  # the first layer's help and settings
        _merge_into(merged, [group_app for _, group_app in same_name])
        info = copy.copy(first)
        info.typer_instance = merged
        target.registered_groups.append(info)


app = assemble([core_commands.app, runs.app, server_commands.app],
               help="Maintenance orchestration for KVM/libvirt fleets.")


def main() -> None:
    """Run the ``hostmaint`` program."""
    app()
