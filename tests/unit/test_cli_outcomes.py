"""The outcome table a run command prints: a dry run's plan, or a long error, is shown whole.

`hostmaint evacuate hv01 --dry-run` ("print the plan, change nothing") printed the plan as one cell,
its line breaks shown as `\\n` and cut after 300 characters, in the middle of its proof line: the
VM-by-VM table never reached the operator's stdout.
"""

from __future__ import annotations

from flows.common import HostOutcome
from hostmaint.models import HostState, StepOutcome
from hostmaint_cli.runs import _show_outcomes, out

PLAN = ("Evacuation plan for hv01 (cluster demo): FEASIBLE\nproof: optimal; " + "x" * 300 + "\n\n"
        "VM      FROM  TO\n------  ----  ----\napp-03  hv01  hv02\nweb\x1b[31m  hv01  hv03")


def _printed(*outcomes: HostOutcome) -> str:
    with out.capture() as captured:
        _show_outcomes(list(outcomes), as_json=False)
    return captured.get()


def test_a_dry_runs_plan_is_printed_whole_below_the_table() -> None:
    text = _printed(HostOutcome(host="hv01", outcome=StepOutcome.DRY_RUN, state=HostState.ACTIVE, detail=PLAN))
    lines = text.splitlines()
    assert any("Evacuation plan for hv01 (cluster demo): FEASIBLE (in full below)" in line for line in lines)
    assert "app-03  hv01  hv02" in lines and "VM      FROM  TO" in lines
    assert "proof: optimal; " + "x" * 300 in lines
    assert "web\\x1b[31m  hv01  hv03" in lines  # a VM name is data: escaped, on its own line
    assert "\\n" not in text.replace("\\x1b", "")


def test_a_one_line_detail_stays_in_its_cell() -> None:
    text = _printed(HostOutcome(host="hv01", outcome=StepOutcome.OK, state=HostState.ACTIVE,
                                detail="3 VM(s) moved; host left cordoned"))
    assert "3 VM(s) moved; host left cordoned" in text and "in full below" not in text
