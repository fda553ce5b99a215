"""Cancelling a hostmaint run safely, the same whether it is served (``serve``) or run by a worker.

Two halves (docs/draining.md, "Stopping a run"):

- **in the run's process** (:func:`stops_safely`, around patch-host, evacuate-host, patch-window,
  return-host, rebalance-cluster and the forms that run them): the run's Cancellation
  (tasks/cancellation.py) is set by SIGTERM or by a poll of its state; its drain (or return, or
  rebalance) aborts and settles, its next step does not start, and the host is stood down
  (:func:`hostmaint.maintenance.stand_down`: cordoned "cancelled by X", every VM on one host, audit
  step ``cancel``), and so are the moves it started (:func:`hostmaint.maintenance.stand_down_moves`).
  The run then ends Cancelled. A SIGTERM that lands outside a drain raises Prefect's
  TerminationSignal; the same stand-down runs on its way out.
- **after the process is gone** (:func:`stand_down_hook`, an ``on_cancellation`` hook): Prefect runs
  it after the kill, in the ``serve`` process for a served flow and in a fresh process for a
  worker's run. It stands the host down again (idempotent), which is all that happens when the
  process was SIGKILLed after the 30 s grace: migrations still running are aborted, moves nobody
  recorded are recorded. For a window, every host subflow still running is.

What Prefect cannot guarantee: a hook does not run when the runner itself dies (SIGKILL of
``serve`` or the worker, a lost machine); the run then stays Cancelling or Running until the server
or the zombie automation ends it. The host stays out of service in whatever state the run reached
(never active unverified), its locks free by themselves when their lease runs out, and a re-run of
the host (or the window) resumes from the recorded state.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import typing
from collections.abc import Callable
from typing import Any, TypeVar, cast
from uuid import UUID

from prefect import runtime
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, Cancelling

from flows.common import default_inventory
from hostmaint.cancel import UNKNOWN, RunCancelled
from hostmaint.errors import InputError
from hostmaint.maintenance import RunContext, stand_down, stand_down_moves
from hostmaint.models import Trigger
from tasks import cancellation
from tasks.common import RuntimeRef, root_run_id

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


def _who(run_ids: tuple[str, ...], fallback: str | None) -> str:
    """Who cancelled the first of ``run_ids`` that names someone (a host's run, then its window's)."""
    for run_id in run_ids:
        try:
            named = cancellation.who_cancelled(run_id)
        except Exception:  # noqa: BLE001 - the server is down: say what this process knows
            continue
        if named != cancellation.FROM_PREFECT:
            return named
    return fallback or cancellation.FROM_PREFECT


def _stand_down(params: dict[str, Any], flow: str, run_id: str, by: str) -> None:
    """Stand down what the run with ``params`` holds: its host (patch-host, evacuate-host,
    return-host), and the moves it started (a return's, a rebalance's: cluster-wide)."""
    host, cluster = params.get("host"), params.get("cluster")
    if not host and not cluster:
        return  # a form's run: its host's work is a subflow, which stands down on its own
    rt = RuntimeRef(params.get("inventory") or default_inventory()).open()
    trigger = params.get("trigger")
    run = RunContext(run_id=run_id, flow=flow, trigger=Trigger(trigger) if trigger else Trigger.UI,
                     operator=by, reason=f"cancelled by {by}")
    if host:
        stand_down(rt, run, host, f"cancelled by {by}")
    stand_down_moves(rt, run, rt.cluster_of(host) if host else str(cluster), f"cancelled by {by}")


def stops_safely(fn: F) -> F:
    """Run a hostmaint flow under its Cancellation; on a cancel, stand down what it holds and end Cancelled.

    Goes under ``@flow``. A flow with a ``host`` parameter stands that host down; every flow stands
    down the moves it started (a return's, a rebalance's); a window stops starting hosts and lets each
    host's subflow stand itself down.

    The wrapper is what Prefect is given, so it must read to Prefect as ``fn`` does: Prefect builds
    the parameter schema (the UI form) and validates parameters from ``inspect.signature``, and
    resolves string annotations (postponed evaluation) in the globals of the function it holds,
    which are this module's. So the wrapper carries ``fn``'s signature with its annotations already
    evaluated (``__signature__``, which ``inspect.signature`` answers before anything else) besides
    ``__wrapped__``: no annotation is left for Prefect to resolve (tests/flows/test_cancel_wrapper.py)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run_stopping_safely(fn, args, kwargs)

    wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    wrapper.__annotations__ = typing.get_type_hints(fn)
    return cast(F, wrapper)


def _run_stopping_safely(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The body of a :func:`stops_safely` flow."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    params = bound.arguments
    run_id = str(runtime.flow_run.id or "")
    if not run_id:
        return fn(*args, **kwargs)
    root = root_run_id() or ""
    also = (root,) if root and root != run_id else ()
    # a window's whole run is graceful: SIGTERM stops it starting hosts and tells every host's
    # subflow (threads get no signal), which stand themselves down, instead of interrupting it
    section = cancellation.graceful() if "host" not in params else contextlib.nullcontext()
    with cancellation.watching(run_id, also) as cancel, section:
        stopped: BaseException | None = None
        try:
            return fn(*args, **kwargs)
        except RunCancelled:
            pass
        except BaseException as exc:
            # a TerminationSignal is Prefect's SIGTERM outside a drain; anything else that ends a
            # cancelled run (a migration aborted under it) is the cancel too
            if not isinstance(exc, TerminationSignal) and not cancel.is_set():
                raise
            stopped = exc
        by = _who((run_id, *also), None if cancel.by == UNKNOWN else cancel.by)
        _stand_down(params, runtime.flow_run.flow_name or fn.__name__, run_id, by)
        if isinstance(stopped, TerminationSignal):
            raise stopped  # Prefect ends the run Cancelled (its runner asked for it)
        return Cancelled(message=f"cancelled by {by}; stopped safely")


def stand_down_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation``: stand down what the cancelled run held, from outside its process.

    Runs after Prefect killed the process (SIGTERM, then SIGKILL after 30 s), in the ``serve``
    process or a worker's fresh process: the flow's own stand-down may never have run. The run's
    subflows still running (a window's hosts, a form's host run, a return's rebalance) are stood
    down too, and marked Cancelled."""
    by = _who((str(flow_run.id),), None)
    _stand_down(dict(flow_run.parameters or {}), flow.name, str(flow_run.id), by)
    for child in _running_children(flow_run.id):
        _stand_down(dict(child.parameters or {}), child.name or flow.name, str(child.id), by)
        _mark_cancelled(child.id, by)


def _running_children(parent: UUID) -> list[Any]:
    """The subflow runs of ``parent`` not yet in a final state (a window's hosts), found on the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
    return [r for r in runs if not (r.state and r.state.type.value in FINAL)]


def _mark_cancelled(run_id: UUID, by: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelled(message=f"cancelled by {by}; stood down by its window's hook"),
                                  force=True)


def request_cancel(run_id: str, by: str, flow: str | None = None) -> str:
    """Ask Prefect to cancel flow run ``run_id`` (what the UI's Cancel does), naming who: the run's
    runner or worker then stops it (SIGTERM), and its host's record says "cancelled by ``by``".
    ``flow``: refuse a run of another flow (InputError). Returns the state the run was in."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(run_id))
        except ObjectNotFound:
            raise InputError(f"RUN: no flow run {run_id} on the Prefect server") from None
        if flow is not None and client.read_flow(run.flow_id).name != flow:
            raise InputError(f"RUN: {run_id} is not a {flow} run")
        kind = run.state.type.value if run.state else "UNKNOWN"
        if kind in FINAL:
            return kind
        client.set_flow_run_state(UUID(run_id), Cancelling(message=f"cancelled by {by}"), force=True)
    return kind
