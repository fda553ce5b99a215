"""``stops_safely`` (flows/cancel.py) wraps the flow function Prefect is given: the wrapper must not
change what Prefect reads from it (the parameter schema the UI's form is drawn from, parameter
validation) nor what it does on a cancel. These fail if the wrapper breaks either, as a plain
``functools.wraps`` wrapper does (Prefect resolves postponed annotations in the globals of the
function it holds: flows/cancel.py's, which know none of a flow module's types)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import Flow, flow, runtime
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel, Field

from flows.cancel import stops_safely
from flows.evacuate_host import evacuate_host
from flows.patch_host import patch_host
from flows.patch_window import patch_window
from flows.rebalance_cluster import rebalance_cluster
from flows.return_host import AfterReturn, return_host
from flows.runbooks.on_request import (
    evacuate_on_request,
    patch_on_request,
    rebalance_on_request,
    return_on_request,
)
from hostmaint.models import Trigger
from tasks import cancellation


class Ask(BaseModel):
    """A form's model known only to this module (as PatchRequest is known only to flows/params.py)."""

    host: str = Field(title="Host")
    count: int = Field(default=1, ge=1)


@flow(name="cancel-wrapper-probe")
@stops_safely
def probe(ask: Ask, cluster: str = "demo", inventory: str | None = None, then: AfterReturn = AfterReturn.NOTHING,
          stop: bool = False) -> str:
    """A flow wrapped as hostmaint's are; asked to, it cancels itself between two steps."""
    if stop:
        run_id = str(runtime.flow_run.id)
        cancel = cancellation.for_run(run_id)
        assert cancel is not None, "the wrapper registered no Cancellation for the run"
        cancel.cancel("uma (test)")
        cancellation.check(run_id, None, "next-step")
    return f"{ask.host} x{ask.count}"


WRAPPED = [patch_host, evacuate_host, patch_window, return_host, rebalance_cluster, patch_on_request,
           evacuate_on_request, rebalance_on_request, return_on_request, probe]


@pytest.mark.parametrize("wrapped", WRAPPED, ids=lambda f: f.name)
def test_the_ui_form_is_the_one_of_the_unwrapped_function(wrapped: Flow) -> None:  # type: ignore[type-arg]
    unwrapped = wrapped.fn.__wrapped__  # type: ignore[attr-defined]
    assert wrapped.parameters.model_dump() == parameter_schema(unwrapped).model_dump()
    # and no parameter fell back to an untyped field (Prefect's fallback when it cannot resolve a type)
    properties = wrapped.parameters.model_dump()["properties"]
    assert all(set(p) - {"title", "position", "description", "default"} for p in properties.values()), properties


def test_parameters_are_validated_into_their_types() -> None:
    params = probe.validate_parameters({"ask": {"host": "hv01", "count": "3"}, "then": "rebalance"})
    assert params["ask"] == Ask(host="hv01", count=3) and params["then"] is AfterReturn.REBALANCE
    with pytest.raises(Exception, match="count"):
        probe.validate_parameters({"ask": {"host": "hv01", "count": 0}})
    assert patch_host.validate_parameters({"host": "hv01", "trigger": "ui"})["trigger"] is Trigger.UI
    form = properties_of(patch_on_request)["request"]
    assert "$ref" in form or "allOf" in form  # the PatchRequest model, drawn as a form


def properties_of(wrapped: Flow) -> dict:  # type: ignore[type-arg]
    return wrapped.parameters.model_dump()["properties"]  # type: ignore[no-any-return]


def test_a_run_cancelled_between_steps_ends_cancelled_naming_who(sim_inventory: Path) -> None:
    assert probe(ask=Ask(host="hv01"), inventory=str(sim_inventory)) == "hv01 x1"
    state = probe(ask=Ask(host="hv01"), inventory=str(sim_inventory), stop=True, return_state=True)
    assert state.is_cancelled(), state
    assert state.message == "cancelled by uma (test); stopped safely"
