"""A local Prefect server for hostmaint, and the one-time setup every server needs.

``hostmaint server`` starts ``prefect server start`` on 127.0.0.1 with:

- analytics off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``): no outside traffic;
- filesystem lease storage for concurrency slots: the default in-memory store
  forgets every lease on restart, so held host locks would leak or be cancelled;
- SQLite under ``PREFECT_HOME`` by default, PostgreSQL when a URL is given
  (``postgresql+asyncpg://...``; several machines need PostgreSQL).

:func:`setup` then makes the server ready, idempotently: the global concurrency
limits from the inventory (flows/locks.py), the zombie-run automation (a run whose
machine died is marked Crashed instead of staying Running forever), and, with a
work pool name, the process work pool and every deployment registered with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, cast

import httpx

from hostmaint.errors import HostmaintError

ZOMBIE_AUTOMATION = "hostmaint: crash flow runs whose process died"
ZOMBIE_WITHIN_S = 90  # three missed heartbeats at PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
HEARTBEAT_S = 30
DEFAULT_POOL = "hostmaint"
DEFAULT_HOME = Path("~/.local/share/hostmaint/prefect")


class ServerError(HostmaintError):
    """The Prefect server did not start or answer."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the server keeps its data and where it listens (loopback only)."""

    home: Path = DEFAULT_HOME
    port: int = 4200
    database_url: str | None = None  # None: SQLite in ``home``
    host: str = "127.0.0.1"
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def server_env(cfg: ServerConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ``prefect server start`` (and of clients that talk to it)."""
    from tasks.prefect_private import FILESYSTEM_LEASE_STORAGE  # Prefect is loaded by what uses it

    home = cfg.home.expanduser().resolve()
    env = dict(os.environ if base is None else base)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": cfg.api_url,
        "PREFECT_SERVER_API_HOST": cfg.host,
        "PREFECT_SERVER_API_PORT": str(cfg.port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASE_STORAGE,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "PREFECT_UI_API_URL": cfg.api_url,
    })
    if cfg.database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = cfg.database_url
    else:
        env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
    env.update(cfg.extra_env)
    return env


def prefect_executable() -> str:
    """The ``prefect`` command of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else "prefect"


def wait_healthy(api_url: str, timeout_s: float = 60.0, process: subprocess.Popen[Any] | None = None) -> float:
    """Wait until ``{api_url}/health`` answers; return the seconds it took. Raise ServerError otherwise."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout_s:
        if process is not None and process.poll() is not None:
            raise ServerError(f"prefect server exited with code {process.returncode} before answering at {api_url}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    raise ServerError(f"no answer from {api_url}/health within {timeout_s:.0f}s (last error: {last})")


@dataclass
class RunningServer:
    """A started ``prefect server start`` process."""

    config: ServerConfig
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (binding it fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def start_server(cfg: ServerConfig, *, timeout_s: float = 90.0, log: Path | None = None) -> RunningServer:
    """Start the server in the background and wait until it answers; its output goes to ``log``.

    A port already taken is refused first: the new server would exit at once ("already in use") while
    whatever listens there answered the health check, so 'hostmaint server' said "up", set up and served
    that other server (another home, another database) and then exited 0."""
    if port_taken(cfg.host, cfg.port):
        raise ServerError(f"port {cfg.port} on {cfg.host} is in use (another Prefect server, say): nothing was "
                          f"started. If it is a server of yours, use it: export PREFECT_API_URL={cfg.api_url}; "
                          "or start this one with --port on a free port")
    env = server_env(cfg)
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log_path = log or home / "server.log"
    out: IO[bytes] = log_path.open("ab")
    argv = [prefect_executable(), "server", "start", "--host", cfg.host, "--port", str(cfg.port)]
    # its own session: a Ctrl-C (or a signal to our process group) reaches us alone, so whatever we
    # serve shuts down against a live server (it pauses its deployments) before we stop the server
    process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    out.close()
    running = RunningServer(cfg, process, log_path)
    try:
        wait_healthy(cfg.api_url, timeout_s, process)
    except ServerError:
        running.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise ServerError(f"prefect server did not start; log {log_path}:\n{tail}") from None
    return running


@contextmanager
def running_server(cfg: ServerConfig, *, timeout_s: float = 90.0) -> Iterator[RunningServer]:
    """A server for the length of a block (tests, demos); stopped on exit."""
    server = start_server(cfg, timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()


# --- setup ---------------------------------------------------------------------------------------------


def ensure_zombie_automation(within_s: int = ZOMBIE_WITHIN_S) -> str:
    """Create (or replace) the automation that marks a run Crashed when its heartbeats stop.

    A flow whose machine died keeps its run "Running" forever and, until its lease
    runs out, its host lock. The server can't see a dead process; it can see that
    heartbeats stopped without a final state. Workers and ``hostmaint serve`` must
    run with ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`` (``server_env`` sets it).
    Returns the automation id.
    """
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed", "prefect.flow-run.Paused",
                # an event is named after the state's name: a run whose plan was not approved ends
                # Cancelled named Rejected (flows/run_display.py)
                "prefect.flow-run.Rejected",
                "prefect.flow-run.Suspended"},
        match={"prefect.resource.id": ["prefect.flow-run.*"]},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive, threshold=1, within=timedelta(seconds=within_s))
    action = ChangeFlowRunState(name=None, state=StateType.CRASHED, force=False,
                                message=f"no heartbeat for {within_s}s: the process running this flow died "
                                        "(its host locks are freed when their leases run out)")
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
            client.delete_automation(old.id)
    automation = cast(Automation, Automation(name=ZOMBIE_AUTOMATION, description="hostmaint: zombie flow runs",
                                             trigger=trigger, actions=[action]).create())
    return str(automation.id)


def ensure_work_pool(name: str = DEFAULT_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   description="hostmaint flows (process workers)"))
            return True


@dataclass
class SetupReport:
    """What :func:`setup` did."""

    limits: list[Any]
    automation_id: str
    work_pool: str | None = None
    work_pool_created: bool = False
    deployments: list[str] = field(default_factory=list)
    served_elsewhere: list[str] = field(default_factory=list)  # left to the `hostmaint serve` that serves them
    notifications: list[str] = field(default_factory=list)  # automation ids (deployments/notifications.py)


def setup(inventory: str | Path, *, work_pool: str | None = None, source: Path | None = None,
          windows: Path | None = None) -> SetupReport:
    """Make the Prefect server at ``$PREFECT_API_URL`` ready for hostmaint; safe to run again.

    Always: the limits of ``inventory`` and the zombie-run automation. With
    ``work_pool``: the process pool and every deployment registered with it, run
    by workers from ``source`` (default: this project's directory). A deployment
    that ``hostmaint serve`` registered (no work pool) is left to it: moving it to
    the pool under a running ``serve`` would crash its runs.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.notifications import ensure_notifications
    from deployments.serve import ROOT, WINDOWS_FILE, build_deployments, remove_orphaned_triggers
    from flows.locks import ensure_limits

    notifications = ensure_notifications(inventory)  # first: a missing block is refused before anything changes
    report = SetupReport(limits=ensure_limits(inventory), automation_id=ensure_zombie_automation(),
                         notifications=notifications)
    remove_orphaned_triggers()
    if work_pool:
        report.work_pool = work_pool
        report.work_pool_created = ensure_work_pool(work_pool)
        for dep in build_deployments(inventory, windows=windows or WINDOWS_FILE, source=source or ROOT):
            full = f"{dep.flow_name}/{dep.name}"
            with get_client(sync_client=True) as client:
                try:
                    served = client.read_deployment_by_name(full).work_pool_name is None
                except ObjectNotFound:
                    served = False
            if served:
                report.served_elsewhere.append(full)
                continue
            dep.apply(work_pool_name=work_pool)
            report.deployments.append(full)
    return report
