"""``hostmaint setup | server | serve | event``: run hostmaint on Prefect.

Part of the ``hostmaint`` program (assembled in ``hostmaint_cli.main``). Every
command talks to the server at ``$PREFECT_API_URL`` (``--api-url`` overrides);
``hostmaint server`` prints the line to export.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from hostmaint.console import make_console
from hostmaint.display import cell, labelled
from hostmaint.errors import HostmaintError, InputError

app = typer.Typer(help="Prefect server, deployments and events.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
event_app = typer.Typer(help="Send a host event (as monitoring would); it starts the matching runbook.",
                        no_args_is_help=True)
app.add_typer(event_app, name="event")

out = make_console()
err = make_console(stderr=True)

InventoryOpt = Annotated[str, typer.Option("--inventory", "-i", envvar="HOSTMAINT_INVENTORY",
                                           help="Inventory YAML file.")]
ApiOpt = Annotated[str | None, typer.Option("--api-url", envvar="PREFECT_API_URL",
                                            help="Prefect API, e.g. http://127.0.0.1:4200/api.")]
PoolOpt = Annotated[str, typer.Option("--work-pool", help="Process work pool the deployments go to.")]
NoDeployOpt = Annotated[bool, typer.Option("--no-deployments",
                                           help="Only limits and automation; 'hostmaint serve' brings its own.")]
SimulatedOpt = Annotated[bool, typer.Option(
    "--simulated", help="Serve every deployment on a fresh SIMULATED fleet (4 hosts, 12 VMs, cluster 'demo'); "
                        "no real host is contacted. Ignores --inventory.")]
TimeScaleOpt = Annotated[float, typer.Option(
    "--time-scale", min=0.001, max=10, help="With --simulated: real seconds per simulated second (the "
                                            "inventory's simulation.time_scale; 1 = real speed).")]
SimHomeOpt = Annotated[Path, typer.Option("--simulated-home", help="With --simulated: where its files and "
                                                                    "its own hostmaint database go.")]


def _fail(exc: Exception) -> typer.Exit:
    # the message may quote a host name or the server's log (one line of it a line): data, not markup
    first, *more = (_unreachable(exc) or str(exc)).split("\n")
    err.print(labelled("error:", "red", first, more), highlight=False)
    return typer.Exit(2 if isinstance(exc, InputError | KeyError) else 1)


def _unreachable(exc: Exception) -> str | None:
    """A server that does not answer, said with its address and what to do: httpx alone says only
    '[Errno 111] Connection refused'."""
    import httpx  # a failure is being reported: the program has paid for nothing yet

    if not isinstance(exc, httpx.TransportError):
        return None
    try:
        url = f"{exc.request.url.scheme}://{exc.request.url.netloc.decode()}"
    except RuntimeError:  # no request attached
        url = os.environ.get("PREFECT_API_URL", "the Prefect API")
    return (f"cannot reach the Prefect server at {url} ({exc or type(exc).__name__}): is it running? "
            "'hostmaint server' starts one and prints the PREFECT_API_URL to export (or give --api-url)")


def _use_api(api_url: str | None) -> str:
    if not api_url:
        raise InputError("no Prefect server: give --api-url or export PREFECT_API_URL "
                         "(e.g. http://127.0.0.1:4200/api, printed by 'hostmaint server')")
    os.environ["PREFECT_API_URL"] = api_url
    return api_url


@contextmanager
def _talking_to(env: Mapping[str, str]) -> Iterator[None]:
    """For the block, this process's Prefect clients (setup, serve) use the server ``env`` names, and so do
    the processes it starts. The environment alone is not enough: Prefect reads its settings once, when it
    is first imported, and a command may have imported it already (starting the server does), so without
    this they would go to whatever PREFECT_API_URL said before, or to a temporary server of their own."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
    updates: dict[object, object] = {PREFECT_API_URL: env["PREFECT_API_URL"]}
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in env:
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    with temporary_settings(updates=updates):  # type: ignore[arg-type]
        yield


def _print_setup(report: object) -> None:
    from deployments.server import SetupReport

    assert isinstance(report, SetupReport)
    changed = [c for c in report.limits if c.action != "unchanged"]
    out.print(f"limits: {len(report.limits)} ({len(changed)} created or updated)")
    for c in changed:
        out.print(f"  {c.action:8} {c.name} = {c.limit}" + (f" (was {c.previous})" if c.previous else ""))
    out.print(f"zombie-run automation: {report.automation_id}")
    if report.work_pool:
        out.print(f"work pool {report.work_pool}: {'created' if report.work_pool_created else 'exists'}")
        for name in report.deployments:
            out.print(f"  deployment {name}")
        for name in report.served_elsewhere:
            out.print(f"  deployment {name}: left alone, 'hostmaint serve' serves it "
                      "(delete it to move it to the pool)")


@app.command("setup")
def setup_cmd(inventory: InventoryOpt = "inventory.yaml", api_url: ApiOpt = None, work_pool: PoolOpt = "hostmaint",
              no_deployments: NoDeployOpt = False) -> None:
    """Create the limits, the zombie-run automation, the work pool and the deployments (idempotent)."""
    from deployments.server import setup

    try:
        with _talking_to({"PREFECT_API_URL": _use_api(api_url)}):
            report = setup(inventory, work_pool=None if no_deployments else work_pool)
    except _api_errors() as exc:
        raise _fail(exc) from None
    _print_setup(report)


def _api_errors() -> tuple[type[Exception], ...]:
    """What a failed command of this module raises, the Prefect API's HTTP errors included. httpx is
    imported here, when an error is being matched, not at the program's start: every command of
    ``hostmaint`` (a plan, a lab command) would otherwise pay for it (0.1-0.5 s measured)."""
    import httpx

    return (HostmaintError, KeyError, httpx.HTTPError)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command("server")
def server_cmd(inventory: Annotated[str | None, typer.Option(
                   "--inventory", "-i", envvar="HOSTMAINT_INVENTORY",
                   help="Also run 'setup' for this inventory once the server answers.")] = None,
               home: Annotated[Path, typer.Option(help="Server data (SQLite database, leases, logs).")]
               = Path("~/.local/share/hostmaint/prefect"),
               port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 4200,
               database_url: Annotated[str | None, typer.Option(
                   "--database-url", envvar="HOSTMAINT_PREFECT_DATABASE_URL",
                   help="postgresql+asyncpg://user:pass@host/db (default: SQLite in --home).")] = None,
               work_pool: PoolOpt = "hostmaint", no_deployments: NoDeployOpt = False,
               simulated: SimulatedOpt = False, time_scale: TimeScaleOpt = 0.2,
               simulated_home: SimHomeOpt = Path("~/.local/share/hostmaint/simulated")) -> None:
    """Start a Prefect server on 127.0.0.1 (analytics off, leases on disk), set it up, keep it running.

    With --simulated it also serves every deployment, on a SIMULATED fleet, from this process:
    one command to try the UI without hypervisors.
    """
    from deployments.server import ServerConfig, server_env, setup, start_server

    cfg = ServerConfig(home=home, port=port, database_url=database_url)
    try:
        server = start_server(cfg)
    except HostmaintError as exc:
        raise _fail(exc) from None
    out.print(f"Prefect server up: UI {cfg.ui_url}  API {cfg.api_url}  (log {server.log_path})")
    out.print(f"  export PREFECT_API_URL={cfg.api_url}")
    try:
        # stop like Ctrl-C: the finally below stops the server (it runs in its own session, so a closed
        # terminal's SIGHUP reaches only us)
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        if simulated:
            with _talking_to(server_env(cfg)):
                _serve_simulated(simulated_home, time_scale)  # until Ctrl-C or SIGTERM; then the server stops too
            return
        if inventory:
            with _talking_to(server_env(cfg)):
                _print_setup(setup(inventory, work_pool=None if no_deployments else work_pool))
            if not no_deployments:
                out.print(f"  run flows: prefect worker start --pool {work_pool}  (with HOSTMAINT_INVENTORY set)")
        server.process.wait()
    except _api_errors() as exc:
        server.stop()
        raise _fail(exc) from None
    except KeyboardInterrupt:
        out.print("stopping the server")
    finally:
        server.stop()


@app.command("serve")
def serve_cmd(inventory: InventoryOpt = "inventory.yaml", api_url: ApiOpt = None,
              limit: Annotated[int | None, typer.Option(help="At most this many runs at once.")] = None,
              windows: Annotated[Path | None, typer.Option(help="Patch window schedules (windows.yaml).")] = None,
              approval_poll_s: Annotated[int | None, typer.Option(
                  "--approval-poll-seconds", min=1, help="How often a run waiting for approval checks (default 10).")]
              = None, simulated: SimulatedOpt = False, time_scale: TimeScaleOpt = 0.2,
              simulated_home: SimHomeOpt = Path("~/.local/share/hostmaint/simulated")) -> None:
    """Serve every deployment from this process (small sites): schedules, forms and runbook triggers."""
    from deployments.serve import WINDOWS_FILE, serve_deployments

    try:
        with _talking_to({"PREFECT_API_URL": _use_api(api_url)}):
            if simulated:
                _serve_simulated(simulated_home, time_scale, limit=limit, approval_poll_s=approval_poll_s)
                return
            serve_deployments(inventory, windows=windows or WINDOWS_FILE, limit=limit,
                              approval_poll_s=approval_poll_s)
    except _api_errors() as exc:
        raise _fail(exc) from None


def _serve_simulated(home: Path, time_scale: float, *, limit: int | None = None,
                     approval_poll_s: int | None = None) -> None:
    """Write a fresh SIMULATED fleet, set the server up for it and serve every deployment on it."""
    from deployments.serve import serve_deployments, simulated_site
    from deployments.server import setup

    inventory = simulated_site(home, time_scale=time_scale)
    err.print(f"[yellow]SIMULATED fleet[/yellow]: 4 hosts, 12 VMs, cluster demo, time scale {time_scale:g}; "
              f"inventory {inventory}, database {os.environ['HOSTMAINT_DB']}. No real host is contacted.",
              soft_wrap=True, highlight=False)
    _print_setup(setup(inventory, work_pool=None))
    out.print("serving every deployment on the SIMULATED fleet; Ctrl-C stops")
    serve_deployments(inventory, limit=limit, approval_poll_s=approval_poll_s)


def send_host_event(api_url: str, event: str, host: str, payload: dict[str, object],
                    cluster: str | None = None) -> str:
    """POST one hostmaint host event to the Prefect API; return its id."""
    from deployments.serve import host_event_resource

    event_id = str(uuid.uuid4())
    body = [{"id": event_id, "occurred": datetime.now(UTC).isoformat(), "event": event,
             "resource": host_event_resource(host, cluster), "payload": payload, "related": []}]
    import httpx

    response = httpx.post(f"{api_url.rstrip('/')}/events", json=body, timeout=30)
    response.raise_for_status()
    return event_id


def _known_cluster(inventory: str | None, host: str) -> str | None:
    if not inventory or not Path(inventory).exists():
        return None
    from flows.params import check_host
    from hostmaint.inventory import load_inventory

    check_host(host, inventory)
    return load_inventory(inventory).host(host).cluster


@event_app.command("degraded")
def event_degraded(host: str, reason: Annotated[str, typer.Option(help="What monitoring saw.")],
                   severity: Annotated[str, typer.Option(help="info | warning | critical (critical: no approval)")]
                   = "warning",
                   source: Annotated[str, typer.Option(help="Who reports it.")] = "cli",
                   inventory: Annotated[str | None, typer.Option("--inventory", "-i", envvar="HOSTMAINT_INVENTORY",
                                                                 help="Check HOST against it.")] = None,
                   api_url: ApiOpt = None) -> None:
    """Report HOST as degraded: the degraded-host runbook starts (and waits for approval unless critical)."""
    from deployments.serve import DEGRADED_EVENT
    from flows.runbooks.approval import Severity

    try:
        if not reason.strip():  # the runbook would refuse it: say so here, before anything is sent
            raise InputError("--reason: say what monitoring saw; an empty reason is refused")
        api = _use_api(api_url)
        if severity.lower() not in {s.value for s in Severity}:
            raise InputError(f"--severity: must be one of {', '.join(s.value for s in Severity)}, got {severity!r}")
        cluster = _known_cluster(inventory, host)
        event_id = send_host_event(api, DEGRADED_EVENT, host, {"reason": reason, "severity": severity.lower(),
                                                               "source": source}, cluster)
    except _api_errors() as exc:
        raise _fail(exc) from None
    out.print(cell(f"sent {DEGRADED_EVENT} for {host} (event {event_id})"))


@event_app.command("vm-starved")
def event_vm_starved(vm: str, reason: Annotated[str, typer.Option(help="What monitoring saw.")],
                     kind: Annotated[str, typer.Option(help="cpu (cpu-starved) | memory (memory-pressure)")] = "cpu",
                     vcpus: Annotated[int | None, typer.Option(help="The vCPUs it should have (default: one more).")]
                     = None,
                     memory: Annotated[str | None, typer.Option(help="The memory it should have, 8G, 512M "
                                                                     "(default: a quarter more).")] = None,
                     source: Annotated[str, typer.Option(help="Who reports it.")] = "cli",
                     api_url: ApiOpt = None) -> None:
    """Report VM as short of CPU or memory: the vm-starved runbook proposes a live resize and waits for approval."""
    from deployments.serve import CPU_STARVED_EVENT, MEMORY_PRESSURE_EVENT, VM_LABEL, VM_RESOURCE_PREFIX
    from hostmaint.resize import MAX_VCPUS, parse_size_mib

    try:
        if not reason.strip():  # the runbook would refuse it: say so here, before anything is sent
            raise InputError("--reason: say what monitoring saw; an empty reason is refused")
        events = {"cpu": CPU_STARVED_EVENT, "memory": MEMORY_PRESSURE_EVENT}
        if kind not in events:
            raise InputError(f"--kind: must be cpu or memory, got {kind!r}")
        if vcpus is not None and not 1 <= vcpus <= MAX_VCPUS:
            raise InputError(f"--vcpus: must be between 1 and {MAX_VCPUS}, got {vcpus}")
        if memory is not None:
            parse_size_mib(memory, "--memory")
        api = _use_api(api_url)
        payload: dict[str, object] = {"reason": reason, "source": source,
                                      **({"vcpus": str(vcpus)} if vcpus is not None else {}),
                                      **({"memory": memory} if memory is not None else {})}
        event_id = str(uuid.uuid4())
        body = [{"id": event_id, "occurred": datetime.now(UTC).isoformat(), "event": events[kind],
                 "resource": {"prefect.resource.id": f"{VM_RESOURCE_PREFIX}{vm}", VM_LABEL: vm},
                 "payload": payload, "related": []}]
        import httpx

        httpx.post(f"{api.rstrip('/')}/events", json=body, timeout=30).raise_for_status()
    except _api_errors() as exc:
        raise _fail(exc) from None
    out.print(cell(f"sent {events[kind]} for {vm} (event {event_id})"))


@event_app.command("hardware-failed")
def event_hardware_failed(host: str, check: Annotated[str, typer.Option(help="The check that failed.")],
                          detail: Annotated[str, typer.Option(help="What it said.")] = "",
                          source: Annotated[str, typer.Option(help="Who reports it.")] = "cli",
                          inventory: Annotated[str | None, typer.Option(
                              "--inventory", "-i", envvar="HOSTMAINT_INVENTORY", help="Check HOST against it.")]
                          = None,
                          api_url: ApiOpt = None) -> None:
    """Report a failed hardware check on HOST: it is cordoned at once and evacuated once approved."""
    from deployments.serve import HARDWARE_EVENT

    try:
        if not check.strip():  # the runbook would refuse it: say so here, before anything is sent
            raise InputError("--check: name the check that failed; an empty check is refused")
        api = _use_api(api_url)
        cluster = _known_cluster(inventory, host)
        event_id = send_host_event(api, HARDWARE_EVENT, host, {"check": check, "detail": detail, "source": source},
                                   cluster)
    except _api_errors() as exc:
        raise _fail(exc) from None
    out.print(cell(f"sent {HARDWARE_EVENT} for {host} (event {event_id})"))


# --- the fault campaign (its engine is the core's hostmaint/lab/chaos.py; Prefect's side is here) -------

lab_app = typer.Typer(help="The local KVM lab (root): real libvirtd, sshd and QEMU guests in netns.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")


@lab_app.command("chaos")
def lab_chaos(rounds: Annotated[int | None, typer.Option(help="Rounds to run.")] = None,
              minutes: Annotated[float | None, typer.Option(help="Run rounds until this much time has passed "
                                                                 "(a round is never cut short).")] = None,
              seed: Annotated[int, typer.Option(help="Draws every round's seed.")] = 1,
              replay: Annotated[list[int] | None, typer.Option(
                  help="Run exactly the round with this round seed (repeat the option for more).")] = None,
              faults: Annotated[int, typer.Option(min=1, max=8, help="Faults a round draws at most.")] = 3,
              classes: Annotated[str | None, typer.Option(help="Fault classes to draw from (comma list).")] = None,
              ops: Annotated[str | None, typer.Option(help="Maintenances to draw from (comma list).")] = None,
              workdir: Annotated[Path | None, typer.Option(help="The lab's workdir (default "
                                                                 "/var/tmp/hostmaint-chaos-netN).")] = None,
              out_dir: Annotated[Path | None, typer.Option("--out", help="Results (default WORKDIR/out).")] = None,
              report_only: Annotated[bool, typer.Option("--report", help="Print the table of the results "
                                                                         "recorded in --out and exit.")] = False,
              ) -> None:
    """A seeded fault campaign on the lab (root, on the net HOSTMAINT_LAB_NET names): exit 1 when a round broke
    an invariant or did not converge.

    Maintenances run with faults injected; the invariants are checked from libvirt and the hosts; a table
    per fault class follows (hostmaint/lab/README.md)."""
    from hostmaint.lab import chaos

    try:
        wanted = [c for c in (classes or ",".join(chaos.FAULT_CLASSES)).split(",") if c]
        maint = [o for o in (ops or ",".join(chaos.OPS)).split(",") if o]
        unknown = sorted(set(wanted) - set(chaos.FAULT_CLASSES)) + sorted(set(maint) - set(chaos.OPS))
        if unknown:
            raise InputError(f"--classes/--ops: unknown {', '.join(unknown)} (known: "
                             f"{', '.join(chaos.FAULT_CLASSES)}; {', '.join(chaos.OPS)})")
        if not report_only and rounds is None and minutes is None and not replay:
            raise InputError("give --rounds, --minutes or --replay")
        root = workdir or chaos.DEFAULT_WORKDIR
        results = out_dir or root / "out"
        if not report_only:
            if os.geteuid() != 0:
                raise InputError("the lab needs root")
            from deployments.chaos import LocalPrefect

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally: the lab and the server go down
            chaos.run_campaign(seed, rounds, minutes, replay or [], root, results, wanted, maint, faults,
                               LocalPrefect, log=lambda line: out.print(cell(line), highlight=False))
        text, ok = chaos.report(results)
    except (HostmaintError, KeyError) as exc:
        raise _fail(exc) from None
    print(text)
    raise typer.Exit(0 if ok else 1)


if __name__ == "__main__":
    app()
