"""The core's commands of the ``hostmaint`` command line: plans, inventory, snapshots, host
state, the audit trail, the lab and what-if estimates. None of them needs Prefect.

The ``hostmaint`` program is assembled in ``hostmaint_cli.main``: these commands, the
commands that start flows (``hostmaint_cli/runs.py``) and the Prefect server's
(``deployments/cli.py``). A new command that uses only the core goes here; one that starts
a flow or talks to Prefect goes there (``hostmaint_cli/__init__.py``).

Exit codes: 0 done, 1 the operation failed (the host was left safe), 2 bad input
(nothing changed).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from hostmaint.console import make_console
from hostmaint.display import cell, labelled
from hostmaint.errors import HostmaintError, InputError, InventoryError, PlanError
from hostmaint.fleet import dump_snapshot, load_snapshot
from hostmaint.models import MigrationOptions, Step
from hostmaint.placement.exact import DEFAULT_BUDGET
from hostmaint.redaction import redact_text

# numpy (the planner's bounds over thousands of hosts) does elementwise work only: one BLAS thread, not
# a pool of them started at its import (~40 ms of a plan at 5,000 hosts). Set before anything imports it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

app = typer.Typer(help="Maintenance orchestration for KVM/libvirt fleets.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
inventory_app = typer.Typer(help="Check inventory files.", no_args_is_help=True)
plan_app = typer.Typer(help="Print plans; nothing changes.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and verify the audit trail.", no_args_is_help=True)
host_app = typer.Typer(help="Host state.", no_args_is_help=True)
lab_app = typer.Typer(help="The local KVM lab (root): real libvirtd, sshd and QEMU guests in netns.",
                      no_args_is_help=True)
simulate_app = typer.Typer(help="What-if estimates from a snapshot.", no_args_is_help=True)
app.add_typer(inventory_app, name="inventory")
app.add_typer(plan_app, name="plan")
app.add_typer(audit_app, name="audit")
app.add_typer(host_app, name="host")
app.add_typer(lab_app, name="lab")
app.add_typer(simulate_app, name="simulate")

out = make_console()
err = make_console(stderr=True)

InventoryOpt = Annotated[str, typer.Option("--inventory", "-i", envvar="HOSTMAINT_INVENTORY",
                                           help="Inventory YAML file.")]
SnapshotOpt = Annotated[Path | None, typer.Option("--snapshot", help="Plan offline from a snapshot JSON file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")]
OperatorOpt = Annotated[str, typer.Option("--operator", envvar="USER", help="Who is acting (for the audit).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (for the audit).")]


@contextmanager
def exit_codes() -> Iterator[None]:
    """Map errors to the documented exit codes, with one clear line on stderr.

    Messages are masked like audit records (:func:`~hostmaint.audit.redact_text`): a failed
    step's message quotes the host's output, and dnf prints repository URLs with their passwords.
    They are printed as data (:func:`~hostmaint.display.labelled`): a VM name they quote is not markup.
    """
    try:
        yield
    except InventoryError as exc:
        if len(exc.problems) == 1:
            err.print(labelled("error:", "red", str(exc)), highlight=False)
        else:  # one problem a line, as the error's own text has them
            err.print(labelled("error:", "red", f"{exc.source}: {len(exc.problems)} problems:",
                               [redact_text(p) for p in exc.problems]), highlight=False)
        raise typer.Exit(2) from None
    except InputError as exc:
        err.print(labelled("error:", "red", redact_text(str(exc))), highlight=False)
        raise typer.Exit(2) from None
    except KeyError as exc:
        err.print(labelled("error:", "red", redact_text(str(exc.args[0] if exc.args else exc))), highlight=False)
        raise typer.Exit(2) from None
    except PlanError as exc:
        err.print(labelled("no safe plan:", "red", redact_text(str(exc))), highlight=False)
        raise typer.Exit(1) from None
    except HostmaintError as exc:
        err.print(labelled("failed:", "red", redact_text(str(exc))), highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:
        if not _from_the_database(exc):
            raise
        # the run stopped at the first state or record it could not write: what it did before that is on
        # record or found by the next run (moves-started), so running it again is what to do
        said = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
        err.print(labelled("failed:", "red", f"the hostmaint database did not answer ({redact_text(said[0])}): "
                           "the run stopped there; run it again once the database answers, it takes up what "
                           "was left"), highlight=False)
        raise typer.Exit(1) from None


def _from_the_database(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLAlchemy's (the hostmaint database failed), told without importing it."""
    return any(cls.__module__.split(".")[0] == "sqlalchemy" for cls in type(exc).__mro__)


def _runtime(inventory: str) -> Any:
    from hostmaint.runtime import open_runtime

    # These commands reach hosts through libvirt only, never over our SSH, so they need no key loader
    # (keys in Prefect Secret blocks are loaded by the commands that start flows: hostmaint_cli.runs).
    return open_runtime(inventory)


def _snapshot_for(inventory: str | None, cluster: str | None, snapshot: Path | None, host: str | None = None) -> Any:
    if snapshot is not None:
        # a command lives as long as its plan: the snapshot (millions of objects, no cycles) need not
        # be walked by every collection the planning's allocations start, nor by the one its load
        # would start on the way out (~0.2 s at 5,000 hosts)
        gc.disable()
        try:
            snap = load_snapshot(snapshot)
            gc.freeze()
        finally:
            gc.enable()
        # every plan names its snapshot's digest: on a second core while this one plans (a large file)
        snap.start_digest()
        return snap
    if inventory is None:
        raise InputError("give --inventory or --snapshot")
    from hostmaint.maintenance import snapshot as discover

    rt = _runtime(inventory)
    if cluster is None:
        if host is None:
            raise InputError("give a cluster")
        cluster = rt.cluster_of(host)
    rt.inventory.cluster(cluster)
    return discover(rt, cluster)


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (what ``--json`` prints)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def simulated_banner(simulated: bool) -> None:
    """Say on stderr that the fleet is SIMULATED, when it is."""
    if simulated:
        err.print("[yellow]SIMULATED fleet: no real host is contacted.[/yellow]")


# --- inventory / snapshot ------------------------------------------------------------------


@inventory_app.command("check")
def inventory_check(file: Path, files: Annotated[bool, typer.Option(
        "--files/--no-files",
        help="Also check, on this machine, the files it names: every known_hosts file and SSH key file exists "
             "and can be read, and known_hosts holds each host's key (else SSH to it is impossible). "
             "--no-files checks the inventory alone, where those files are not (CI, a laptop).")] = True,
                    windows: Annotated[Path | None, typer.Option(
                        help="Also check this windows.yaml (the patch window schedules) against the inventory, "
                             "as 'hostmaint setup' and 'serve' will read it.")] = None) -> None:
    """Validate an inventory file: exit 0 when valid, 2 otherwise (every problem named)."""
    from hostmaint.inventory import load_inventory  # not at the top: a plan from a snapshot file needs none

    with exit_codes():
        inv = load_inventory(file)
        if files:
            problems = _named_file_problems(inv)
            if problems:
                raise InventoryError(problems, str(file))
        notes = _check_windows(windows, [c.name for c in inv.clusters]) if windows is not None else []
        what = "valid" if files else "valid; the files it names were not checked (--no-files)"
        out.print(cell(f"{file}: {what} — {len(inv.clusters)} cluster(s), {len(inv.hosts)} host(s)"))
        for note in notes:
            out.print(cell(note))


def _check_windows(path: Path, clusters: list[str]) -> list[str]:
    """windows.yaml as setup/serve read it: strictly, overrides naming inventory clusters, exclusions on window days.

    Returns a note per window the rule puts in the hour the clocks skip (moved past the jump).
    """
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from hostmaint.window_schedule import clock_changes, load_windows, window_rrule

    default, overrides = load_windows(path, known=clusters)
    notes = []
    for name, cfg in {"default": default, **{f"clusters.{c}": o for c, o in overrides.items()}}.items():
        try:
            window_rrule(cfg)
        except InputError as exc:
            raise InputError(f"{path}: {name}: {exc}") from None
        moved = clock_changes(cfg)
        if moved:
            now = datetime.now(ZoneInfo(cfg.timezone)).replace(tzinfo=None)
            nxt = next((c for c in moved if c.nominal >= now), moved[-1])
            notes.append(f"{path}: {name}: {len(moved)} window(s) fall in the hour the clocks skip in {cfg.timezone} "
                         f"and open after the jump, never before (e.g. {nxt.nominal:%Y-%m-%d %H:%M} opens at "
                         f"{nxt.opens:%H:%M})")
    return notes


def _named_file_problems(inv: Any) -> list[str]:
    """The inventory's files that are missing or unreadable, then hosts their known_hosts cannot verify."""
    from hostmaint.drivers.ssh import known_hosts_problem
    from hostmaint.inventory import file_problem, file_problems

    problems = file_problems(inv)
    if inv.simulation is not None:
        return problems  # a SIMULATED fleet contacts no host: its known_hosts holds no keys
    by_problem: dict[str, list[tuple[int, str]]] = {}
    for i, h in enumerate(inv.hosts):
        if file_problem(h.ssh.known_hosts) is not None:
            continue  # said above
        problem = known_hosts_problem(h.ssh)
        if problem is not None:
            by_problem.setdefault(problem, []).append((i, h.name))
    for problem, hosts in by_problem.items():  # a line that does not parse is said once, for all its hosts
        names = f"host {hosts[0][1]}" if len(hosts) == 1 else f"hosts {', '.join(n for _, n in hosts)}"
        problems.append(f"hosts[{hosts[0][0]}].ssh.known_hosts ({names}): {problem}")
    return problems


@app.command()
def snapshot(inventory: InventoryOpt = "inventory.yaml",
             cluster: Annotated[str | None, typer.Option(help="Cluster (default: the first).")] = None,
             output: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file.")] = None) -> None:
    """Discover a cluster and write its fleet snapshot (JSON, docs/snapshot.md)."""
    with exit_codes():
        rt = _runtime(inventory)
        simulated_banner(rt.simulated)
        cluster = cluster or rt.inventory.clusters[0].name
        snap = _snapshot_for(inventory, cluster, None)
        text = dump_snapshot(snap)
        if output:
            output.write_text(text)
            err.print(cell(f"wrote {output}: {len(snap.hosts)} host(s), {len(snap.vms)} VM(s)"))
        else:
            sys.stdout.write(text)


# The planner's exact stage: how much CP-SAT work a plan may spend (placement/exact.py).
ExactBudgetOpt = Annotated[float, typer.Option(
    "--exact-budget", help="Deterministic seconds (about a second of CPU each) the planner's exact stage may spend "
                           "proving the plan best or the drain impossible; 0: greedy only. Raise it when a plan "
                           "says no placement was found within its budget.")]


def checked_budget(value: float) -> float:
    """``--exact-budget`` checked: 0 to 600 deterministic seconds, else InputError (exit 2)."""
    if not 0 <= value <= 600:
        raise InputError(f"--exact-budget: must be between 0 and 600 deterministic seconds, got {value:g}")
    return value


def checked_range(option: str, value: float, low: float, high: float, *, above_low: bool = False) -> float:
    """``value`` of ``option`` in [low, high] (``above_low``: (low, high]), else InputError (exit 2).
    NaN and infinities never pass: the simulator's clock given ``--patch-seconds nan`` never advanced."""
    inside = (low < value if above_low else low <= value) and value <= high
    if not inside:  # also NaN, which compares false with everything
        side = "above" if above_low else "at least"
        raise InputError(f"{option}: must be {side} {low:g} and at most {high:g}, got {value:g}")
    return value


# --- plans --------------------------------------------------------------------------------------


@plan_app.command("drain")
def plan_drain(host: str, inventory: InventoryOpt = "inventory.yaml", snapshot: SnapshotOpt = None,
               patch: Annotated[bool, typer.Option(
                   "--patch", help="Plan as a patch does: focused on as few hosts as hold the VMs (they come "
                                   "back, or a window rebalances); without it, as an evacuation: balanced.")] = False,
               as_json: JsonOpt = False, exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Plan the evacuation of HOST (exit 1 when it cannot be done safely)."""
    from hostmaint.placement import check_capacity, plan_evacuation, render_plan

    with exit_codes():
        snap = _snapshot_for(inventory, None, snapshot, host)
        try:
            snap.host(host)
        except KeyError:
            raise InputError(f"host {host!r} is not in cluster {snap.cluster}") from None
        plan = plan_evacuation(snap, [host], focus=patch, exact_budget=checked_budget(exact_budget))
        if plan.capacity is None:
            plan = plan.model_copy(update={"capacity": check_capacity(snap, [host])})
        if as_json:
            print_json({**plan.model_dump(mode="json"), "feasible": plan.feasible})
        else:
            out.print(Text(render_plan(plan)), highlight=False, soft_wrap=True)
        if not plan.feasible:
            raise typer.Exit(1)


@plan_app.command("window")
def plan_window_cmd(cluster: str, inventory: InventoryOpt = "inventory.yaml", snapshot: SnapshotOpt = None,
                    as_json: JsonOpt = False, exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Plan a rolling window over CLUSTER: host order and evacuation targets."""
    from hostmaint.placement import plan_window, render_plan

    with exit_codes():
        snap = _snapshot_for(inventory if snapshot is None else None, cluster, snapshot)
        if snap.cluster != cluster:
            raise InputError(f"the snapshot is of cluster {snap.cluster!r}, not {cluster!r}")
        plan = plan_window(snap, exact_budget=checked_budget(exact_budget))
        if as_json:
            print_json({**plan.model_dump(mode="json"), "feasible": plan.feasible})
        else:
            out.print(Text(render_plan(plan)), highlight=False, soft_wrap=True)


@plan_app.command("rebalance")
def plan_rebalance_cmd(cluster: str, max_moves: int = 10, inventory: InventoryOpt = "inventory.yaml",
                       snapshot: SnapshotOpt = None, as_json: JsonOpt = False,
                       exact_budget: ExactBudgetOpt = DEFAULT_BUDGET) -> None:
    """Plan a rebalance of CLUSTER with at most MAX_MOVES migrations."""
    from hostmaint.placement import plan_rebalance, render_plan

    with exit_codes():
        if max_moves < 0:
            raise InputError(f"--max-moves: must be >= 0, got {max_moves}")
        snap = _snapshot_for(inventory if snapshot is None else None, cluster, snapshot)
        if snap.cluster != cluster:
            raise InputError(f"the snapshot is of cluster {snap.cluster!r}, not {cluster!r}")
        plan = plan_rebalance(snap, max_moves, exact_budget=checked_budget(exact_budget))
        if as_json:
            print_json(plan.model_dump(mode="json"))
        else:
            out.print(Text(render_plan(plan)), highlight=False, soft_wrap=True)


# --- host state -----------------------------------------------------------------------------------------


NO_RECORD = "no maintenance recorded"


@host_app.command("status")
def host_status(inventory: InventoryOpt = "inventory.yaml", as_json: JsonOpt = False,
                probe: Annotated[bool, typer.Option(
                    "--probe/--no-probe",
                    help="Read each host's migration address and QEMU TLS certificates over SSH (what the "
                         "precheck reads); without it the network comes from the inventory.")] = False) -> None:
    """Every host's maintenance state, the migration link its drains will use (and why), and the network
    and encryption its migrations travel with."""
    with exit_codes():
        from dataclasses import replace

        from hostmaint.maintenance import link_figures, state_as_seen
        from hostmaint.models import HostState
        from hostmaint.state import NEVER_SEEN
        from hostmaint.window import operator_hold, status_reason

        rt = _runtime(inventory)
        links = {h: f for c in rt.inventory.clusters for h, f in link_figures(rt.inventory, rt.states, c.name).items()}
        transport = _transport_view(rt, probe)
        rows = []
        shown: dict[str, str] = {}  # the table's reason: an evacuation's own words and who asked
        for h in rt.inventory.hosts:
            rec = state_as_seen(rt, h.name)  # a state that says empty is checked against libvirt
            link = links[h.name]
            # VMs maintenance moved off it and did not bring back (their recorded origin is this host)
            away = sorted(rt.states.origins(h.name))
            # a failed host's reason is its error (see exit_codes)
            # no record yet: hostmaint has not taken it through anything ("never seen" read as unreachable)
            fresh = rec.since == NEVER_SEEN
            # who took it out and why, from the run that began its maintenance (the state's reason by
            # then is a drain's "drained")
            stored = rt.states.get(h.name)
            hold = None if fresh or stored.state is HostState.ACTIVE else operator_hold(
                stored, rt.states.history(h.name), rt.audit.records(host=h.name))
            rows.append({"host": h.name, "cluster": h.cluster, "state": rec.state.value,
                         "reason": NO_RECORD if fresh else redact_text(rec.reason),
                         "since": None if fresh else rec.since.isoformat(), "vms_away": away,
                         "out_of_service": None if hold is None else {
                             "held": hold.held.value, "reason": redact_text(hold.reason), "by": hold.by,
                             "flow": hold.flow, "since": hold.since.isoformat()},
                         "link_mib_s": link.mib_s, "link_basis": link.basis, "link_note": link.note,
                         **transport[h.name]})
            shown[h.name] = status_reason(rows[-1]["reason"], None if hold is None else
                                          replace(hold, reason=redact_text(hold.reason)))
        if as_json:
            print_json(rows)
            return
        table = Table(title="hosts")
        for col in ("host", "cluster", "state", "reason", "VMs away", "link MiB/s", "link from", "migrates on",
                    "TLS"):
            table.add_column(col)
        for r in rows:
            basis = r["link_basis"] + (f": {r['link_note']}" if r["link_note"] else "")
            table.add_row(*map(cell, (r["host"], r["cluster"], r["state"], shown[r["host"]],
                                      ", ".join(r["vms_away"]) or "-", f"{r['link_mib_s']:.0f}", basis,
                                      r["migrates_on"], r["tls"])))
        out.print(table)


def _transport_view(rt: Any, probe: bool) -> dict[str, dict[str, Any]]:
    """Per host: the network its migrations arrive on and the cluster's TLS mode (with ``probe``: read from
    the host, with what its certificates lack)."""
    from datetime import UTC, datetime

    from hostmaint.migration.transport import network_name, pair_problem, tls_problems
    from hostmaint.migration.transport_probe import probe_cluster

    view: dict[str, dict[str, Any]] = {}
    now = datetime.now(UTC)
    for c in rt.inventory.clusters:
        names = [h.name for h in rt.inventory.hosts_of(c.name)]
        ends = probe_cluster(rt.shell, rt.inventory, names) if probe and not rt.simulated else {}
        ready = [n for n, e in ends.items() if e.probed_tls and not e.problems and not tls_problems(e, now)]
        for h in rt.inventory.hosts_of(c.name):
            end = ends.get(h.name)
            # a SIMULATED fleet has no QEMU: its migrations are never encrypted, whatever the mode says
            tls = c.migration.tls.value + (" (simulated fleet: not encrypted)" if rt.simulated else "")
            if end is None:
                address = h.migration_address
                where = (network_name(address, c.migration.network) if address or not c.migration.network
                         else f"an address in {c.migration.network} (--probe finds it)")
            else:
                address = end.address
                where = network_name(address, c.migration.network)
                problems = list(end.problems) + (tls_problems(end, now) if end.probed_tls else [])
                # ready on its own, but no peer's QEMU accepts it (or it none): another CA
                pairs = [pair_problem(end, ends[p]) or pair_problem(ends[p], end) for p in ready if p != h.name]
                if h.name in ready and pairs and all(pairs):
                    problems.append(str(pairs[0]))
                tls += ": " + ("; ".join(problems) if problems else "ready" if end.probed_tls else "not checked")
            view[h.name] = {"migrates_on": where, "migration_address": address, "tls": tls}
    return view


@host_app.command("reset")
def host_reset(host: str, inventory: InventoryOpt = "inventory.yaml", operator: OperatorOpt = "unknown",
               reason: ReasonOpt = "operator reset") -> None:
    """Clear a failed host back to cordoned (after an operator fixed it)."""
    from hostmaint.models import HostState

    def reset(rt: Any, run: Any) -> Any:
        state = rt.states.state(host)
        if state is not HostState.FAILED:
            # a host in maintenance belongs to its run: resetting it would take it from under that run
            raise InputError(f"{host} is {state.value}, not failed: reset clears only a failed host"
                             + (" (uncordon returns a cordoned one to service)" if state is HostState.CORDONED
                                else ""))
        return rt.states.transition(host, HostState.CORDONED, reason, run.run_id)

    _host_change(host, inventory, operator, reason, Step.RESET, reset)


@host_app.command("cordon")
def host_cordon(host: str, inventory: InventoryOpt = "inventory.yaml", operator: OperatorOpt = "unknown",
                reason: ReasonOpt = "operator cordon") -> None:
    """Take HOST out of placement until an operator uncordons it; a later maintenance leaves it cordoned."""
    _host_change(host, inventory, operator, reason, Step.OPERATOR_CORDON,
                 lambda rt, run: rt.states.set_aside(host, reason, run.run_id))


@host_app.command("uncordon")
def host_uncordon(host: str, inventory: InventoryOpt = "inventory.yaml", operator: OperatorOpt = "unknown",
                  reason: ReasonOpt = "operator uncordon") -> None:
    """Return an operator-cordoned HOST to service (a host in maintenance is its run's to finish)."""
    _host_change(host, inventory, operator, reason, Step.OPERATOR_UNCORDON,
                 lambda rt, run: rt.states.return_to_service(host, reason, run.run_id))


def _host_change(host: str, inventory: str, operator: str, reason: str, step: Step,
                 change: Callable[[Any, Any], Any]) -> None:
    """An operator's change of a host's state: audited, refused with exit 2 when the state forbids it."""
    from hostmaint.errors import StateError
    from hostmaint.maintenance import RunContext, audited
    from hostmaint.models import Trigger

    with exit_codes():
        rt = _runtime(inventory)
        rt.inventory.host(host)
        run = RunContext(flow="cli", trigger=Trigger.CLI, operator=operator, reason=reason)
        before = rt.states.get(host)
        try:
            with audited(rt, run, step, host=host, inputs={"reason": reason, "state_before": before.state.value}):
                record = change(rt, run)
        except StateError as exc:
            raise InputError(str(exc)) from exc
        out.print(cell(f"{host}: {record.state.value}"))


# --- audit ------------------------------------------------------------------------------------------------


def _audit(inventory: str | None) -> Any:
    from hostmaint.audit import AuditTrail
    from hostmaint.db import open_engine

    return AuditTrail(open_engine())


@audit_app.command("show")
def audit_show(host: Annotated[str | None, typer.Option(help="Only this host.")] = None,
               run: Annotated[str | None, typer.Option(help="Only this run id.")] = None,
               limit: int = 200, as_json: JsonOpt = False) -> None:
    """The audit records as a table."""
    with exit_codes():
        records = _audit(None).records(host=host, run_id=run)
        records = records[-limit:] if limit else records
        if as_json:
            print_json([_record_dict(r) for r in records])
            return
        table = Table(title=f"audit ({len(records)} records)")
        for col in ("seq", "time", "flow", "trigger", "operator", "host", "vm", "step", "outcome", "s"):
            table.add_column(col)
        for r in records:
            d = _record_dict(r)
            table.add_row(*map(cell, (str(d["seq"]), str(d["time"])[:19], d["flow"] or "", d["trigger"] or "",
                                      d["operator"] or "", d["host"] or "", d["vm"] or "", d["step"],
                                      d["outcome"], f"{d['duration_s'] or 0:.2f}")))
        out.print(table)


def _record_dict(r: Any) -> dict[str, Any]:
    if hasattr(r, "model_dump"):
        return dict(r.model_dump(mode="json"))
    from dataclasses import asdict

    return asdict(r)


@audit_app.command("export")
def audit_export(fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl") -> None:
    """Export the whole audit trail (for a change ticket)."""
    with exit_codes():
        if fmt not in ("jsonl", "csv"):
            raise InputError(f"--format: must be jsonl or csv, got {fmt!r}")
        sys.stdout.writelines(_audit(None).export_lines(fmt))


@audit_app.command("verify")
def audit_verify(anchor: Annotated[str | None, typer.Option(
                     "--anchor", help="A head printed by an earlier verify (SEQ:HASH, or just the hash): it "
                                      "must still be in the chain. Without one, deleting the newest records "
                                      "goes unnoticed.")] = None,
                 as_json: JsonOpt = False) -> None:
    """Check the hash chain: exit 1 naming the first record altered, removed or reordered, or the records
    missing below --anchor. Prints the chain's head: note it (the change ticket) and pass it as --anchor later."""
    with exit_codes():
        report = _audit(None).verify(anchor=_parse_anchor(anchor) if anchor is not None else None)
        if as_json:
            print_json({"ok": report.ok, "count": report.count, "first_bad_seq": report.first_bad_seq,
                         "problem": report.problem, "head": str(report.head), "anchor": anchor})
        elif report.ok:
            out.print(f"audit trail verified: {report.count} record(s), chain intact"
                      + (f"; anchor {anchor} in place" if anchor else ""))
            out.print(f"head: {report.head}", highlight=False, soft_wrap=True)
        else:
            err.print(labelled("audit trail broken:", "red", report.problem), highlight=False, soft_wrap=True)
            err.print(f"last record that verified: {report.head}", highlight=False, soft_wrap=True)
        if not report.ok:
            raise typer.Exit(1)


def _parse_anchor(text: str) -> Any:
    from hostmaint.audit import parse_anchor

    try:
        return parse_anchor(text)
    except ValueError as exc:
        raise InputError(f"--anchor: {exc}") from None


# --- lab ----------------------------------------------------------------------------------------------------


@lab_app.command("up")
def lab_up_cmd(hosts: int = 3, vms: int = 6, workdir: Path | None = None,
               tls: Annotated[bool, typer.Option(
                   "--tls", help="Its own PKI, libvirtd on TLS with client certificates checked, QEMU migration "
                                 "TLS and a migration network; the inventory says migration.tls: required "
                                 "(hostmaint/lab/README.md).")] = False) -> None:
    """Build the real local lab: hosts in network namespaces, libvirtd, sshd, QEMU guests."""
    from hostmaint.lab import lab_up

    with exit_codes():
        info = (lab_up(hosts=hosts, vms=vms, tls=tls) if workdir is None
                else lab_up(hosts=hosts, vms=vms, workdir=workdir, tls=tls))
        out.print(f"inventory: {info.inventory_path}\nknown_hosts: {info.known_hosts_path}", markup=False)
        out.print(Path(info.inventory_path).read_text(), highlight=False, markup=False, emoji=False)


@lab_app.command("down")
def lab_down_cmd(workdir: Path | None = None) -> None:
    """Remove every process, namespace, link and mount the lab made."""
    from hostmaint.lab import lab_down

    with exit_codes():
        lab_down(**({} if workdir is None else {"workdir": workdir}))
        out.print("lab down")


@lab_app.command("status")
def lab_status_cmd(workdir: Path | None = None) -> None:
    """What of the lab is running."""
    from hostmaint.lab import lab_status

    with exit_codes():
        out.print(lab_status(**({} if workdir is None else {"workdir": workdir})))


# --- what-if ----------------------------------------------------------------------------------------------


@simulate_app.command("window")
def simulate_window_cmd(cluster: str, inventory: InventoryOpt = "inventory.yaml", snapshot: SnapshotOpt = None,
                        patch_seconds: Annotated[float, typer.Option(help="Update + reboot + verify per host.")]
                        = 600.0,
                        parallel: Annotated[int | None, typer.Option(help="Hosts at once (default: what N+1 "
                                                                      "capacity and the limits allow).")] = None,
                        window_hours: Annotated[float | None, typer.Option(
                            help="Say whether the patching fits (exit 1 if not). The closing rebalance is "
                                 "not counted: patch-window does not start it once the window has ended.")]
                        = None,
                        dirty_rates: Annotated[Path | None, typer.Option(
                            help="JSON {vm: MiB/s}, e.g. from 'hostmaint simulate dirty-rates'.")] = None,
                        rebalance_within_pct: Annotated[float, typer.Option(
                            help="The closing rebalance levels each host's memory use to within this many "
                                 "points of the cluster's (patch-window's rebalance_within_pct).")] = 10.0,
                        rebalance: Annotated[bool, typer.Option(
                            "--rebalance/--no-rebalance",
                            help="Estimate the window's closing rebalance (--no-rebalance: none).")] = True,
                        as_json: JsonOpt = False) -> None:
    """Estimate a patch window's duration for CLUSTER from a snapshot (a model, not a run).

    Links come from the inventory when it is there, else from what past drains measured (else 1100 MiB/s;
    'hostmaint host status' shows each host's figure and its basis); dirty rates from --dirty-rates
    (else unknown: every VM counted as idle, which makes the estimate optimistic for busy guests)."""
    from hostmaint.migration.simulate import SimParams, simulate_window
    from hostmaint.models import StepOutcome
    from hostmaint.placement import plan_window
    from hostmaint.window_schedule import HOSTS_AT_ONCE_MAX, WINDOW_MINUTES_MAX

    with exit_codes():
        snap = _snapshot_for(inventory if snapshot is None else None, cluster, snapshot)
        if snap.cluster != cluster:
            raise InputError(f"the snapshot is of cluster {snap.cluster!r}, not {cluster!r}")
        if parallel is not None:
            checked_range("--parallel", parallel, 1, HOSTS_AT_ONCE_MAX)
        # the range patch-window accepts: a target of 100 points or more would level nothing
        if not 0 <= rebalance_within_pct < 100:
            raise InputError(f"--rebalance-within-pct: must be in [0, 100), got {rebalance_within_pct:g}")
        checked_range("--patch-seconds", patch_seconds, 0, 7 * 24 * 3600)
        if window_hours is not None:
            checked_range("--window-hours", window_hours, 0, WINDOW_MINUTES_MAX / 60, above_low=True)
        rates = _read_dirty_rates(dirty_rates, {v.name for v in snap.vms}) if dirty_rates else None
        params, policy, options = SimParams(), None, MigrationOptions()
        if Path(inventory).exists():
            from hostmaint.inventory import load_inventory

            inv = load_inventory(inventory)
            if any(c.name == cluster for c in inv.clusters):
                from hostmaint.db import open_engine
                from hostmaint.maintenance import drain_settings, link_figures
                from hostmaint.state import HostStateStore

                # the links the drains would use: the inventory's, else what past drains measured
                figures = link_figures(inv, HostStateStore(open_engine()), cluster)
                params = SimParams(link_mib_s={h: f.mib_s for h, f in figures.items()})
                policy, options = drain_settings(inv, cluster)
        estimate = simulate_window(snap, plan_window(snap), patch_s=patch_seconds, parallel=parallel,
                                   dirty_rate=rates, params=params, policy=policy, options=options,
                                   rebalance_within=rebalance_within_pct / 100 if rebalance else None,
                                   slot_bound=True)
        # the patching alone: patch-window skips its levelling rather than overrun an ended window
        fits = None if window_hours is None else estimate.fits(window_hours * 3600)
        if as_json:
            print_json({"cluster": cluster, "makespan_s": estimate.makespan_s, "parallel": estimate.parallel,
                         "serial_s": estimate.serial_s, "lower_bound_s": estimate.bound_s, "fits": fits,
                         "rebalance_moves": estimate.rebalance_moves, "rebalance_s": estimate.rebalance_s,
                         "total_s": round(estimate.total_s, 3),
                         "hosts": [{"host": h.host, "start_s": h.start_s, "drain_start_s": h.drain_start_s,
                                    "drained_s": h.drained_s,
                                    "end_s": h.end_s, "migrations": h.migrations, "outcome": h.outcome.value}
                                   for h in estimate.hosts]})
        else:
            table = Table(title=cell(f"what-if window for {cluster} (a model; see docs/draining.md for its error)"))
            for col in ("host", "start", "drain starts", "drained", "done", "migrations", "outcome"):
                table.add_column(col)
            for h in estimate.hosts:
                table.add_row(*map(cell, (h.host, _hms(h.start_s), _hms(h.drain_start_s), _hms(h.drained_s),
                                          _hms(h.end_s), str(h.migrations), h.outcome.value)))
            out.print(table)
            out.print(f"makespan {_hms(estimate.makespan_s)} with {estimate.parallel} host(s) at once, up to "
                      f"{estimate.drains_at_once} draining; serial would take {_hms(estimate.serial_s)}; "
                      f"lower bound {_hms(estimate.bound_s)}")
            if not rebalance:
                closing = "none (--no-rebalance)"
            elif any(h.outcome is not StepOutcome.OK for h in estimate.hosts):
                closing = "none (patch-window levels the cluster only when every host was patched)"
            elif not estimate.rebalance_moves:
                closing = f"no moves (levelling to within {rebalance_within_pct:g} points needs none, or none helps)"
            else:
                closing = (f"{estimate.rebalance_moves} move(s), {estimate.rebalance_s / 60:.1f} min; "
                           f"{_hms(estimate.total_s)} in all (skipped when the window has ended)")
            out.print(f"closing rebalance: {closing}")
            if fits is not None:
                out.print(f"the patching fits a {window_hours:g} h window: {'yes' if fits else 'NO'}")
        if fits is False:
            raise typer.Exit(1)


def _read_dirty_rates(path: Path, vms: set[str]) -> dict[str, float]:
    """{vm: MiB/s} from JSON; every value a number >= 0 and every VM one of the snapshot's."""
    from hostmaint.config_file import parse_json, read_text
    from hostmaint.inventory import BANDWIDTH_MIB_S_BOUND

    data = parse_json(read_text(path), str(path))  # FileFormatError (exit 2) naming the file and place
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object {{vm: MiB/s}}, got {type(data).__name__}")
    rates: dict[str, float] = {}
    for vm, rate in data.items():
        if vm not in vms:
            raise InputError(f"{path}: {vm}: not a VM of the snapshot")
        # NaN (json reads it) compares false: "not rate >= 0" refuses it with the negatives, and a rate
        # past any link's with the infinities
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= BANDWIDTH_MIB_S_BOUND:
            raise InputError(f"{path}: {vm}: must be a number of MiB/s from 0 to {BANDWIDTH_MIB_S_BOUND}, got {rate!r}")
        rates[vm] = float(rate)
    return rates


@simulate_app.command("dirty-rates")
def simulate_dirty_rates(cluster: str, inventory: InventoryOpt = "inventory.yaml",
                         seconds: Annotated[float, typer.Option(help="Sampling period per host.")] = 2.0,
                         output: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSON here.")]
                         = None) -> None:
    """Measure how fast each running VM of CLUSTER dirties memory now (MiB/s, QEMU page sampling:
    guests are not slowed). Feed it to 'simulate window --dirty-rates'."""
    from hostmaint.migration.probe import probe_dirty_rates

    with exit_codes():
        checked_range("--seconds", seconds, 0, 3600, above_low=True)
        rt = _runtime(inventory)
        rt.inventory.cluster(cluster)  # a typo measured nothing and wrote an empty file, exit 0
        simulated_banner(rt.simulated)
        hosts = [h.name for h in rt.inventory.hosts_of(cluster)]
        vms = [vm for h in hosts for vm in rt.hypervisor.running_vms(h)]
        rates, notes = probe_dirty_rates(rt.hypervisor, hosts, vms, seconds)
        for note in notes:
            err.print(cell(note, style="yellow"))
        text = json.dumps({vm: round(r, 1) for vm, r in sorted(rates.items())}, indent=2) + "\n"
        if output:
            output.write_text(text)
            err.print(cell(f"wrote {output}: {len(rates)} of {len(vms)} VM(s) measured"))
        else:
            sys.stdout.write(text)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
