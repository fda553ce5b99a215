"""A subflow finds the run at the top of its tree once, not on every ask.

Prefect's ``runtime.flow_run.root_flow_run_id`` reads the parent's task run and flow run from the
server (each with a client made for it) every time it is read; a patch window's host subflow asked
for it at its start, for its drain's progress and for its summary.
"""

from __future__ import annotations

from typing import Any

import prefect.runtime.flow_run as flow_run_module
import pytest
from prefect import flow, runtime

from tasks.common import root_run_id

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_subflow_reads_its_tree_from_the_server_once_and_finds_its_parent_at_the_top(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real_task_run, real_flow_run = flow_run_module._get_task_run, flow_run_module._get_flow_run

    async def task_run(task_run_id: str) -> Any:
        reads.append("task run")
        return await real_task_run(task_run_id)

    async def flow_run(flow_run_id: str) -> Any:
        reads.append("flow run")
        return await real_flow_run(flow_run_id)

    monkeypatch.setattr(flow_run_module, "_get_task_run", task_run)
    monkeypatch.setattr(flow_run_module, "_get_flow_run", flow_run)

    @flow
    def child() -> tuple[list[str | None], str]:
        return [root_run_id() for _ in range(3)], str(runtime.flow_run.id)

    @flow
    def parent() -> tuple[str, list[str | None], str, str | None]:
        roots, child_id = child()
        return str(runtime.flow_run.id), roots, child_id, root_run_id()

    parent_id, roots, child_id, parents_root = parent()

    assert roots == [parent_id] * 3 and child_id != parent_id
    assert parents_root == parent_id  # a run that is no subflow is its own top
    assert reads == ["task run", "flow run"], reads  # the child's parent task run and its run, once
    assert root_run_id() is None  # outside a flow run
