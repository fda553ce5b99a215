"""The flows' own numbers are bounded where they are declared (flows/common.py): Prefect refuses a bad
one before the flow's body runs, naming it, and the UI's run form shows the bounds.

A negative max_failed_hosts made a window start no host and report "failure limit reached"; a
max_hosts_in_parallel of 0 or less was quietly read as 1; window_minutes of .inf ended the run in an
OverflowError from timedelta; a lock wait of nan never gave up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema

from flows.evacuate_host import evacuate_host
from flows.patch_host import patch_host
from flows.patch_window import patch_window
from flows.rebalance_cluster import rebalance_cluster
from flows.resize_vm import resize_vm
from flows.return_host import return_host
from flows.runbooks.degraded_host import degraded_host_runbook
from flows.runbooks.on_request import evacuate_on_request, patch_on_request
from hostmaint.runtime import open_runtime
from hostmaint.window_schedule import WindowConfig

pytestmark = pytest.mark.usefixtures("prefect_server")

WINDOW = {"cluster": "demo"}
HOST = {"host": "hv01"}
RESIZE = {"request": {"vm": "vm01", "vcpus": 2, "reason": "more", "operator": "ops"}}

BAD: list[tuple[Any, dict[str, Any], str]] = [
    (patch_window, {**WINDOW, "max_hosts_in_parallel": 0}, "max_hosts_in_parallel"),
    (patch_window, {**WINDOW, "max_hosts_in_parallel": -3}, "max_hosts_in_parallel"),
    (patch_window, {**WINDOW, "max_failed_hosts": -1}, "max_failed_hosts"),
    (patch_window, {**WINDOW, "window_minutes": math.inf}, "window_minutes"),
    (patch_window, {**WINDOW, "window_minutes": -30}, "window_minutes"),
    (patch_window, {**WINDOW, "window_minutes": 10**12}, "window_minutes"),
    (patch_window, {**WINDOW, "rebalance_within_pct": math.nan}, "rebalance_within_pct"),
    (patch_window, {**WINDOW, "rebalance_moves": -2}, "rebalance_moves"),
    (patch_window, {**WINDOW, "exact_budget": math.inf}, "exact_budget"),
    (patch_host, {**HOST, "hosts_at_once": 0}, "hosts_at_once"),
    (patch_host, {**HOST, "lock_wait_s": math.nan}, "lock_wait_s"),
    (evacuate_host, {**HOST, "lock_wait_s": -1}, "lock_wait_s"),
    (evacuate_host, {**HOST, "exact_budget": -0.5}, "exact_budget"),
    (rebalance_cluster, {**WINDOW, "max_moves": -1}, "max_moves"),
    (return_host, {**HOST, "max_moves": -5}, "max_moves"),
    (return_host, {**HOST, "lock_wait_s": math.inf}, "lock_wait_s"),
    (resize_vm, {**RESIZE, "approval_timeout_s": 0}, "approval_timeout_s"),
    (resize_vm, {**RESIZE, "poll_interval_s": -10}, "poll_interval_s"),
    (patch_window, {**WINDOW, "window_minutes": 8 * 24 * 60}, "window_minutes"),  # windows.yaml's week, too
    (degraded_host_runbook, {**HOST, "poll_interval_s": 0}, "poll_interval_s"),
    (degraded_host_runbook, {**HOST, "lock_wait_s": math.inf}, "lock_wait_s"),
    (evacuate_on_request, {"request": {}, "approval_timeout_s": -1}, "approval_timeout_s"),
    (patch_on_request, {"request": {}, "lock_wait_s": -60}, "lock_wait_s"),
]


@pytest.mark.parametrize(("flow", "params", "field"), BAD,
                         ids=[f"{f.name}-{field}-{params[field]}" for f, params, field in BAD])
def test_a_bad_number_is_refused_naming_it(flow: Any, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ParameterTypeError) as err:
        flow.validate_parameters(params)
    assert f"{field}:" in str(err.value), str(err.value)


def test_the_numbers_in_their_bounds_still_pass() -> None:
    window = patch_window.validate_parameters({**WINDOW, "max_hosts_in_parallel": 4, "max_failed_hosts": 0,
                                               "window_minutes": 240.5, "rebalance_moves": 0,
                                               "rebalance_within_pct": 0, "exact_budget": 0})
    assert (window["max_hosts_in_parallel"], window["window_minutes"], window["rebalance_moves"]) == (4, 240.5, 0)
    assert evacuate_host.validate_parameters({**HOST, "lock_wait_s": None})["lock_wait_s"] is None  # wait on
    assert return_host.validate_parameters({**HOST, "lock_wait_s": 0})["lock_wait_s"] == 0  # do not wait


def test_the_run_form_shows_the_bounds() -> None:
    props = parameter_schema(patch_window.fn).model_dump()["properties"]
    assert (props["max_hosts_in_parallel"]["minimum"], props["max_hosts_in_parallel"]["maximum"]) == (1, 1024)
    assert props["max_failed_hosts"]["minimum"] == 0
    window = next(s for s in props["window_minutes"]["anyOf"] if s.get("type") == "number")
    assert window["exclusiveMinimum"] == 0
    assert parameter_schema(rebalance_cluster.fn).model_dump()["properties"]["max_moves"]["minimum"] == 0


def test_a_run_with_a_bad_number_fails_before_anything_is_done(sim_inventory: Path) -> None:
    rt = open_runtime(sim_inventory)
    hosts = [h.name for h in rt.inventory.hosts]
    before = (len(rt.audit.records()), [rt.states.state(h) for h in hosts])
    with pytest.raises(ParameterTypeError, match="max_failed_hosts"):
        patch_window(cluster="demo", max_failed_hosts=-1, inventory=str(sim_inventory), operator="t")
    after = open_runtime(sim_inventory)
    assert (len(after.audit.records()), [after.states.state(h) for h in hosts]) == before


def test_a_windows_yaml_that_loads_makes_runs_the_flow_takes() -> None:
    # the schedule's bounds are the flow's: a window of 2,000 hosts at once loaded, and each of its
    # runs would then fail on the flow's own bound
    with pytest.raises(ValueError, match="max_hosts_in_parallel"):
        WindowConfig(rrule="FREQ=WEEKLY", max_hosts_in_parallel=2000)
    config = WindowConfig(rrule="FREQ=WEEKLY", max_hosts_in_parallel=1024, window_minutes=7 * 24 * 60)
    patch_window.validate_parameters({**WINDOW, "max_hosts_in_parallel": config.max_hosts_in_parallel,
                                      "window_minutes": config.window_minutes})
