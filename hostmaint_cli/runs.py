"""The commands that start Prefect flows: evacuate, patch, rebalance, window run/stop, run cancel,
host return and demo.

Each checks its input with the core first (exit 2, nothing started), then runs the flow in this
process and prints each host's outcome. Groups named as the core's (``host``) are merged into
them by ``hostmaint_cli.main``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from hostmaint.cli import (
    DryRunOpt,
    ExactBudgetOpt,
    InventoryOpt,
    JsonOpt,
    OperatorOpt,
    ReasonOpt,
    checked_budget,
    err,
    exit_codes,
    out,
    print_json,
    simulated_banner,
)
from hostmaint.display import cell
from hostmaint.errors import InputError, ServerError
from hostmaint.placement.exact import DEFAULT_BUDGET
from hostmaint.redaction import redact_text

app = typer.Typer(no_args_is_help=True)
window_app = typer.Typer(help="Patch windows.", no_args_is_help=True)
host_app = typer.Typer(help="Host state.", no_args_is_help=True)
run_app = typer.Typer(help="Prefect runs of hostmaint.", no_args_is_help=True)
vm_app = typer.Typer(help="Running VMs.", no_args_is_help=True)
app.add_typer(window_app, name="window")
app.add_typer(vm_app, name="vm")
app.add_typer(host_app, name="host")
app.add_typer(run_app, name="run")

T = TypeVar("T")


def _runtime(inventory: str) -> Any:
    from hostmaint.runtime import open_runtime

    # The runtime is cached per process and the flows reuse it, so it needs the key loader the tasks
    # give theirs, or hosts keyed by a Secret block could not connect.
    return open_runtime(inventory, key_loader=_secret_block_key)


def _secret_block_key(name: str) -> str:
    from tasks.common import load_secret_block  # Prefect is imported only when a host's key is in a block

    return load_secret_block(name)


def _run_flow(fn: Callable[..., T], **kwargs: Any) -> T:
    from prefect.exceptions import CancelledRun, ParameterTypeError

    from hostmaint.cancel import RunCancelled
    from hostmaint.models import Trigger
    from tasks.prefect_private import is_unreachable_api

    kwargs.setdefault("trigger", Trigger.CLI)
    name = getattr(fn, "name", getattr(fn, "__name__", "flow"))
    # A spinner on the terminal; the run's steps are narrated by Prefect's log lines around it.
    with out.status(f"[bold]{name}[/bold] running (Ctrl-C stops it; the host is left in a safe state)",
                    spinner="dots"), _ctrl_c_stops_safely(str(kwargs.get("operator") or "unknown")), \
            _patient_temporary_server():
        try:
            return fn(**kwargs)
        except ParameterTypeError as exc:
            # a number past the flow's own bounds (flows/common.py): refused before the run did anything
            raise InputError(f"{name}: {' '.join(str(exc).split())}") from None
        except CancelledRun as exc:
            # Ctrl-C here, or 'hostmaint run cancel' / the UI's Cancel: the run stood its hosts down
            raise RunCancelled(f"{name}: {exc}: a host it had taken out of service stays out with that reason "
                               "('hostmaint host status'); run the same command again to finish", None, None) from None
        except RuntimeError as exc:
            # a server it cannot reach (restarting, down): one line, not a traceback
            if not is_unreachable_api(exc):
                raise
            raise ServerError(f"{name}: {exc} Run it again once the server answers: a run that began "
                              "goes on from each host's recorded state ('hostmaint host status' shows "
                              "where each host is).") from exc


# Prefect gives the temporary server it starts without PREFECT_API_URL (the demo, a dry run) 20 s; its
# first start (a new database) on a busy machine takes longer, and the demo died with a traceback
TEMPORARY_SERVER_WAIT_S = 120


@contextmanager
def _patient_temporary_server() -> Iterator[None]:
    """For the block, wait up to TEMPORARY_SERVER_WAIT_S for Prefect's temporary server (unless the operator
    set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), and say in one line when it did not answer."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from tasks.prefect_private import is_temporary_server_timeout

    chosen = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ
    wait_s = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 0 if chosen else TEMPORARY_SERVER_WAIT_S)
    try:
        with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: wait_s}):
            yield
    except RuntimeError as exc:
        if not is_temporary_server_timeout(exc):
            raise
        raise ServerError(f"Prefect's temporary server (PREFECT_API_URL is not set) did not answer within {wait_s} s; "
                          "nothing was started. Start a server with 'hostmaint server' and export the "
                          "PREFECT_API_URL it prints, or wait longer: export "
                          "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300") from None


@contextmanager
def _ctrl_c_stops_safely(operator: str) -> Iterator[None]:
    """While a flow runs here, the first Ctrl-C stops it as a Cancel does (docs/draining.md, "Stopping a
    run"): a drain aborts its migrations in flight, no further step starts, each host the run took out of
    service stays out 'cancelled by OPERATOR (Ctrl-C)', and the run ends Cancelled. Interrupting it instead
    would stop it mid-step, with no stand-down and its Prefect run left Running. A second Ctrl-C, or one
    before the run has begun, interrupts at once."""
    from tasks import cancellation

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    asked = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal asked
        if asked or not cancellation.registered():
            raise KeyboardInterrupt
        asked = True
        err.print(cell("Ctrl-C: stopping safely: migrations in flight are aborted and no further step starts (a "
                       "step under way, an update say, ends first); Ctrl-C again quits at once, leaving the "
                       "hosts for a re-run to finish"), highlight=False)
        cancellation.cancel_all(f"{operator} (Ctrl-C)")

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _show_outcomes(outcomes: list[Any], as_json: bool) -> None:
    # a failed host's detail is its error, which may quote host output (see exit_codes)
    if as_json:
        print_json([{**o.model_dump(mode="json"), "detail": redact_text(o.detail)} for o in outcomes])
        return
    table = Table(title="outcome per host")
    for col in ("host", "outcome", "state", "rebooted", "packages", "seconds", "detail"):
        table.add_column(col)
    in_full = []  # a multi-line or long detail (a dry run's plan, an error) is shown whole below the table
    for o in outcomes:
        detail = redact_text(o.detail)
        first, _, rest = detail.partition("\n")
        shown = first[:300] + (" (in full below)" if rest or len(first) > 300 else "")
        table.add_row(*map(cell, (o.host, o.outcome.value, o.state or "-", "yes" if o.rebooted else "no",
                                  str(o.packages_changed), f"{o.seconds:.1f}", shown)))
        if shown != first:
            in_full.append((o.host, detail))
    out.print(table)
    for host, detail in in_full:
        out.print(cell(f"{host}:", style="bold"))
        for line in detail.split("\n"):  # each line escaped on its own: a name in it cannot start a line
            out.print(cell(line))
    migrations = [m for o in outcomes for m in o.migrations]
    if migrations:
        mt = Table(title="migrations")
        for col in ("vm", "from", "to", "seconds", "downtime ms", "outcome"):
            mt.add_column(col)
        for m in migrations:
            mt.add_row(*map(cell, (m.vm, m.source, m.target, f"{m.seconds:.2f}",
                                   "-" if m.downtime_ms is None else f"{m.downtime_ms:.0f}", m.outcome.value)))
        out.print(mt)


def _exit_if_failed(outcomes: list[Any]) -> None:
    # a run that returns (a rebalance whose moves failed, say) instead of raising must not exit 0
    failed = [o for o in outcomes if o.outcome.value == "failed"]
    if failed:
        err.print(cell(f"failed: {', '.join(o.host for o in failed)}: {redact_text(failed[0].detail)[:300]}"))
        raise typer.Exit(1)


DRY_RUN_NEEDS_NONE = "--dry-run needs no server"


def _need_server(dry_run: bool = False, without: str | None = DRY_RUN_NEEDS_NONE) -> None:
    """Refuse, before anything starts, a run that changes hosts when no Prefect server is configured.

    Such a run takes its locks (one maintenance per host, the cluster's limits) on the server. Without
    one Prefect would start a temporary server holding none of them, and the run would fail there,
    twenty seconds later, with nothing changed. A dry run takes no lock. ``without`` says what the
    command can do with no server (a command with no --dry-run must not offer one).
    """
    from prefect.settings import PREFECT_API_URL

    from flows.locks import NO_SERVER

    if not dry_run and not PREFECT_API_URL.value():
        raise InputError(f"{NO_SERVER}; nothing was started" + (f" ({without})" if without else ""))


def _check_host(inventory: str, host: str) -> Any:
    rt = _runtime(inventory)
    rt.inventory.host(host)
    simulated_banner(rt.simulated)
    return rt


@app.command()
def evacuate(host: str, inventory: InventoryOpt = "inventory.yaml", dry_run: DryRunOpt = False,
             operator: OperatorOpt = "unknown", reason: ReasonOpt = "on-demand evacuation",
             as_json: JsonOpt = False, exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Cordon HOST and live-migrate every VM off it (the plan is printed first)."""
    from flows.evacuate_host import evacuate_host

    with exit_codes():
        _check_host(inventory, host)
        _need_server(dry_run)
        result = _run_flow(evacuate_host, host=host, dry_run=dry_run, operator=operator, reason=reason,
                           inventory=inventory, exact_budget=checked_budget(exact_budget))
        _show_outcomes([result], as_json)


@app.command()
def patch(host: str, inventory: InventoryOpt = "inventory.yaml", dry_run: DryRunOpt = False,
          operator: OperatorOpt = "unknown", reason: ReasonOpt = "patch", as_json: JsonOpt = False,
          no_return: Annotated[bool, typer.Option("--no-return", help="Leave moved VMs where they are.")] = False,
          exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Evacuate, update, reboot when needed, verify, uncordon HOST and return its VMs."""
    from flows.patch_host import patch_host

    with exit_codes():
        _check_host(inventory, host)
        _need_server(dry_run)
        result = _run_flow(patch_host, host=host, dry_run=dry_run, operator=operator, reason=reason,
                           inventory=inventory, return_vms=not no_return, exact_budget=checked_budget(exact_budget))
        _show_outcomes([result], as_json)


@vm_app.command("resize")
def vm_resize(vm: str,
              vcpus: Annotated[int | None, typer.Option(help="The vCPU count it should have.")] = None,
              memory: Annotated[str | None, typer.Option(help="The memory it should have: 8G, 512M, 4096 (MiB).")]
              = None,
              inventory: InventoryOpt = "inventory.yaml", dry_run: DryRunOpt = False,
              operator: OperatorOpt = "unknown", reason: ReasonOpt = "resize", as_json: JsonOpt = False) -> None:
    """Grow VM's vCPUs and/or memory live, NUMA-aware (the plan is printed first; a migration comes first
    when its host cannot hold it grown)."""
    from pydantic import ValidationError

    from flows.common import HostOutcome
    from flows.resize_vm import ResizeRequest, resize_vm
    from hostmaint.errors import PlanError
    from hostmaint.maintenance import snapshot
    from hostmaint.models import StepOutcome
    from hostmaint.resize import parse_size_mib, plan_resize, render_resize

    with exit_codes():
        mib = parse_size_mib(memory) if memory is not None else None
        try:
            request = ResizeRequest(vm=vm, vcpus=vcpus, memory=memory, operator=operator, reason=reason,
                                    dry_run=False, approval_required=False, inventory=inventory)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            raise InputError(f"{where}: {first['msg']}") from None
        rt = _runtime(inventory)
        simulated_banner(rt.simulated)
        hosts = rt.hypervisor.locate(vm)
        if len(hosts) != 1:
            raise InputError(f"vm: {vm!r} is " + ("not running on any host of the inventory" if not hosts
                                                  else f"running on {len(hosts)} hosts"))
        plan = plan_resize(snapshot(rt, rt.cluster_of(hosts[0])), vm, vcpus=vcpus, memory_mib=mib)
        for line in render_resize(plan):  # names from hosts already shown as data (display.visible)
            out.print(line, markup=False, highlight=False)
        if not plan.feasible:
            raise PlanError("resize refused: " + "; ".join(plan.refusals))
        if dry_run or not plan.changes:
            return
        _need_server()
        result = _run_flow(resize_vm, request=request)
        if not isinstance(result, HostOutcome):  # only a run that asked for approval ends rejected
            raise typer.Exit(1)
        _show_outcomes([result], as_json)
        if result.outcome is not StepOutcome.OK:
            raise typer.Exit(1)


@window_app.command("run")
def window_run(cluster: str, inventory: InventoryOpt = "inventory.yaml",
               max_parallel: Annotated[int, typer.Option(help="Hosts in maintenance at once.")] = 1,
               window_end: Annotated[datetime | None, typer.Option(help="No host starts that cannot finish "
                                                                    "before this time (ISO, UTC).")] = None,
               max_failed: Annotated[int, typer.Option(help="Stop starting hosts after more failures.")] = 0,
               window_id: Annotated[str | None, typer.Option(help="Re-use to resume a window.")] = None,
               operator: OperatorOpt = "unknown", as_json: JsonOpt = False,
               exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Roll patch-host through CLUSTER inside a window."""
    from flows.patch_window import patch_window

    with exit_codes():
        rt = _runtime(inventory)
        rt.inventory.cluster(cluster)
        simulated_banner(rt.simulated)
        if max_parallel < 1:
            raise InputError(f"--max-parallel: must be >= 1, got {max_parallel}")
        if max_failed < 0:
            raise InputError(f"--max-failed: must be >= 0, got {max_failed}")
        _need_server(without=f"'hostmaint plan window {cluster}' shows the window's plan without one")
        outcomes = _run_flow(patch_window, cluster=cluster, inventory=inventory, max_hosts_in_parallel=max_parallel,
                             window_end=window_end, max_failed_hosts=max_failed, window_id=window_id,
                             operator=operator, exact_budget=checked_budget(exact_budget))
        _show_outcomes(outcomes, as_json)
        _exit_if_failed(outcomes)
        # hosts the window never started (its end, its failure limit): not done, whatever was done
        left = [o.host for o in outcomes if o.outcome.value == "skipped" and o.detail.startswith("not started:")]
        if left:
            err.print(cell(f"window left {len(left)} host(s) unpatched: {', '.join(left)}; run it again with the "
                           "same --window-id to finish them"))
            raise typer.Exit(1)


def _cancel_run(run: str, operator: str, flow: str | None = None) -> None:
    from uuid import UUID

    from flows.cancel import request_cancel

    try:
        UUID(run)
    except ValueError:
        raise InputError(f"RUN: not a flow run id: {run!r}") from None
    import httpx

    try:
        before = request_cancel(run, operator, flow=flow)
    except httpx.TransportError as exc:  # the server is down: one line, not an httpx traceback
        from prefect.settings import PREFECT_API_URL

        raise ServerError(f"cannot reach the Prefect server at {PREFECT_API_URL.value()} ({exc}): nothing was "
                          "asked to stop; run it again once the server answers ('hostmaint server' starts "
                          "one)") from None
    if before in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
        out.print(f"run {run} already ended ({before.lower()}): nothing to stop", markup=False, highlight=False)
        return
    out.print(f"run {run} ({before.lower()}) asked to stop: its drain aborts what is in flight (post-copy "
              f"finishes), its host stays cordoned 'cancelled by {operator}'; 'hostmaint host status' shows it, "
              "and running it again finishes the host", markup=False, highlight=False)


@run_app.command("cancel")
def run_cancel(run: Annotated[str, typer.Argument(help="The flow run id (as the Prefect UI shows it).")],
               operator: OperatorOpt = "unknown") -> None:
    """Stop a hostmaint run safely, as the Prefect UI's Cancel does, naming who stopped it."""
    with exit_codes():
        _cancel_run(run, operator)


@window_app.command("stop")
def window_stop(run: Annotated[str, typer.Argument(help="The patch-window run's id.")],
                operator: OperatorOpt = "unknown") -> None:
    """Stop a patch window: no host starts, the hosts it holds stop safely (cordoned, VMs running)."""
    with exit_codes():
        _cancel_run(run, operator, flow="patch-window")


@app.command()
def rebalance(cluster: str, inventory: InventoryOpt = "inventory.yaml", max_moves: int = 10,
              dry_run: DryRunOpt = False, operator: OperatorOpt = "unknown", as_json: JsonOpt = False,
              exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Level CLUSTER's memory load with at most MAX_MOVES live migrations."""
    from flows.rebalance_cluster import rebalance_cluster

    with exit_codes():
        rt = _runtime(inventory)
        rt.inventory.cluster(cluster)
        if max_moves < 0:
            raise InputError(f"--max-moves: must be >= 0, got {max_moves}")
        _need_server(dry_run)
        result = _run_flow(rebalance_cluster, cluster=cluster, max_moves=max_moves, dry_run=dry_run,
                           operator=operator, inventory=inventory, exact_budget=checked_budget(exact_budget))
        _show_outcomes([result], as_json)
        _exit_if_failed([result])


@host_app.command("return")
def host_return(host: str, inventory: InventoryOpt = "inventory.yaml", operator: OperatorOpt = "unknown",
                reason: ReasonOpt = "evacuation over",
                then: Annotated[str, typer.Option(help="Once it is back: return-vms (to it), rebalance (the "
                                                       "cluster) or nothing.")] = "return-vms",
                max_moves: Annotated[int, typer.Option(help="With --then rebalance: at most this many moves.")] = 10,
                as_json: JsonOpt = False) -> None:
    """End HOST's evacuation: verify it, put it back as it was before, then return its VMs (or rebalance)."""
    from flows.return_host import AfterReturn, return_host

    with exit_codes():
        _check_host(inventory, host)
        try:
            after = AfterReturn(then)
        except ValueError:
            raise InputError(f"--then: one of {', '.join(a.value for a in AfterReturn)}, got {then!r}") from None
        _need_server(without=None)
        result = _run_flow(return_host, host=host, operator=operator, reason=reason, then=after, max_moves=max_moves,
                           inventory=inventory)
        _show_outcomes([result], as_json)
        _exit_if_failed([result])


# --- demo -----------------------------------------------------------------------------------------------


@app.command()
def demo(simulated: Annotated[bool, typer.Option("--simulated", help="Use the in-memory fleet, not the lab.")]
         = False,
         workdir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
         hosts: Annotated[int | None, typer.Option(help="Lab hosts (default 3); the simulated fleet always has 4.")]
         = None,
         vms: Annotated[int | None, typer.Option(help="Lab guests (default 6); the simulated fleet always has 12.")]
         = None,
         keep: Annotated[bool, typer.Option(help="Leave the lab up.")] = False,
         as_json: JsonOpt = False) -> None:
    """Run a patch window end to end: on the real local lab (root), or --simulated."""
    with exit_codes():
        if simulated:
            # they were taken and ignored: a 'demo --simulated --hosts 8' still patched 4 hosts
            given = [name for name, value in (("--hosts", hosts), ("--vms", vms), ("--keep", keep or None))
                     if value is not None]
            if given:
                raise InputError(f"{', '.join(given)}: for the lab only; the simulated demo is always 4 hosts and "
                                 "12 VMs (drop --simulated for the lab, as root)")
            _demo_simulated(workdir, as_json)
        else:
            _demo_lab(workdir, 3 if hosts is None else hosts, 6 if vms is None else vms, keep, as_json)


def _use_demo_db(workdir: Path) -> Path:
    """Give the demo its own empty database in ``workdir`` (``use_fresh_database``), and say so when
    that overrides an exported HOSTMAINT_DB (docs/deployments.md has operators export production's)."""
    from hostmaint.simulated_fleet import use_fresh_database

    exported = os.environ.get("HOSTMAINT_DB")
    db = use_fresh_database(workdir)
    if exported and exported != str(db):
        err.print(cell(f"the demo uses its own database {db}; HOSTMAINT_DB ({_shown_db(exported)}) is not touched"),
                  highlight=False, soft_wrap=True)
    return db


def _shown_db(url: str) -> str:
    """A database URL as the CLI may print it: its password masked."""
    return redact_text(url)


def _ensure_limits(inventory: Path) -> None:
    # The flows refuse to run without their concurrency limits; the demo sets them up as 'hostmaint setup' would.
    from flows.locks import ensure_limits

    ensure_limits(inventory)


def _demo_simulated(workdir: Path | None, as_json: bool = False) -> None:
    from flows.patch_window import patch_window
    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    workdir = workdir or Path.home() / ".local/share/hostmaint/demo-simulated"
    workdir.mkdir(parents=True, exist_ok=True)
    db = _use_demo_db(workdir)
    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(workdir, snap, demo_packages(snap), time_scale=0.05)
    err.print("[yellow]SIMULATED fleet[/yellow]: 4 hosts, 12 VMs, anti-affinity pair db-1/db-2, "
              "hv02 has a pending kernel update")
    with _patient_temporary_server():
        _ensure_limits(inventory)
        started = time.monotonic()
        outcomes = _run_flow(patch_window, cluster=snap.cluster, inventory=str(inventory), max_hosts_in_parallel=1,
                             window_id="demo", operator="demo")
    _show_outcomes(outcomes, as_json)
    (err if as_json else out).print(cell(f"window finished in {time.monotonic() - started:.1f}s; audit trail: {db} "
                   f"(hostmaint audit show / verify with HOSTMAINT_DB={db})"))


def _demo_lab(workdir: Path | None, hosts: int, vms: int, keep: bool, as_json: bool = False) -> None:
    from flows.patch_window import patch_window
    from hostmaint.lab import lab_down, lab_up

    if os.geteuid() != 0:
        raise InputError("the lab needs root; run 'hostmaint demo --simulated' on machines without it")
    kwargs: dict[str, Any] = {} if workdir is None else {"workdir": workdir}
    started = time.monotonic()
    info = lab_up(hosts=hosts, vms=vms, **kwargs)
    db = _use_demo_db(Path(info.inventory_path).parent)  # a new lab has no history
    (err if as_json else out).print(f"lab up in {time.monotonic() - started:.1f}s: {len(info.hosts)} hosts, inventory "
              f"{info.inventory_path}", markup=False)
    _ensure_limits(Path(info.inventory_path))
    try:
        outcomes = _run_flow(patch_window, cluster="lab", inventory=str(info.inventory_path),
                             max_hosts_in_parallel=1, window_id=f"lab-{int(time.time())}", operator="demo")
        _show_outcomes(outcomes, as_json)
        (err if as_json else out).print(f"audit trail: {db}; Prefect UI: run 'prefect server start' "
                  "and set PREFECT_API_URL=http://127.0.0.1:4200/api before the demo to see the runs", markup=False)
        _exit_if_failed(outcomes)
    finally:
        if not keep:
            lab_down(**kwargs)
