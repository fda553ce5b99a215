"""A real site: ``prefect server start`` on 127.0.0.1, ``hostmaint setup`` and ``hostmaint serve`` as processes.

One module-scoped site (server + serve ≈ 25 s) carries the tests that need real
processes: an event starting the runbook through the deployment trigger, the UI
form in headless Chromium, and a flow process killed mid-drain then run again.
Everything is SIMULATED hosts; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from prefect.server.schemas.schedules import RRuleSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_support import ALL_VMS, make_fleet, where

from deployments.serve import ENTRYPOINTS, ROOT, WINDOWS_FILE
from deployments.server import ServerConfig, ensure_zombie_automation, server_env
from hostmaint.audit import AuditTrail
from hostmaint.db import open_engine
from hostmaint.models import HostState, StepOutcome
from hostmaint.state import HostStateStore
from hostmaint.window_schedule import load_windows, window_rrule

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "test-artifacts"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def flow_of(deployment: str) -> str:
    """The flow a served deployment runs, read from its entrypoint (a window's deployments run patch-window)."""
    from prefect.flows import load_flow_from_entrypoint

    if deployment not in ENTRYPOINTS:
        return "patch-window"
    path, _, func = ENTRYPOINTS[deployment][0].partition(":")
    return load_flow_from_entrypoint(f"{ROOT / path}:{func}").name


@dataclass
class Site:
    """The running site: server, serve process, simulated fleet, hostmaint database."""

    config: ServerConfig
    inventory: Path
    db: Path
    env: dict[str, str]
    workdir: Path
    pool_deployment: dict[str, Any] = field(default_factory=dict)  # as `setup` registered it, before serve

    @property
    def api(self) -> str:
        return self.config.api_url

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Call the API; retry 503 like Prefect's own client (SQLite answers "database is locked" under load)."""
        for attempt in range(6):
            response = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
            if response.status_code != 503 or attempt == 5:
                break
            time.sleep(0.5 * (attempt + 1))
        response.raise_for_status()
        return response.json() if response.content else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def deployment(self, name: str) -> dict[str, Any]:
        """A deployment by its short name (``evacuate-host``, ``patch-window-demo``, ...)."""
        return dict(self.get(f"/deployments/name/{flow_of(name)}/{name}"))

    def runs_of(self, deployment_id: str) -> list[dict[str, Any]]:
        return list(self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                                    "sort": "EXPECTED_START_TIME_DESC", "limit": 20}))

    def wait_run(self, deployment_id: str, states: set[str], where: Any = lambda r: True,
                 timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            for run in self.runs_of(deployment_id):
                if where(run):
                    seen.append(run["state"]["type"])
                    if run["state"]["type"] in states:
                        return run
            time.sleep(0.3)
        raise AssertionError(f"no run in {states} within {timeout}s (saw {seen[-5:]})")

    def limit(self, name: str) -> dict[str, Any]:
        return dict(self.get(f"/v2/concurrency_limits/{name}"))

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "deployments.cli", *args], cwd=ROOT, env=env or self.env,
                              capture_output=True, text=True, timeout=120)


def stop(process: subprocess.Popen[Any], timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL to the process group after ``timeout``; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


def wait_for(what: str, ready: Any, process: subprocess.Popen[Any], log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"{what} exited {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not ready in {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """`hostmaint server -i INVENTORY` (server + setup), then `hostmaint serve`, as the README says."""
    work = tmp_path_factory.mktemp("site")
    config = ServerConfig(home=work / "prefect", port=free_port())
    inventory = make_fleet(work / "fleet")
    db = work / "hostmaint.db"
    env = {**server_env(config), "HOSTMAINT_DB": str(db), "HOSTMAINT_INVENTORY": str(inventory),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "HOSTMAINT_LOCK_LEASE_SECONDS": "60",
           "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1", "PYTHONPATH": str(ROOT),
           "PREFECT_LOGGING_LEVEL": "INFO"}  # runs log their plan at INFO; the UI shows it
    site = Site(config, inventory, db, env, work)
    server_log = work / "server-cli.log"
    with server_log.open("w") as out:
        # as from an operator's shell, where PREFECT_API_URL is exported only after the server is up
        server = subprocess.Popen([PY, "-m", "deployments.cli", "server", "--home", str(config.home), "--port",
                                   str(config.port), "-i", str(inventory)], cwd=ROOT, stdout=out,
                                  env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                                  stderr=subprocess.STDOUT, start_new_session=True)
    serve_log = work / "serve.log"
    serve: subprocess.Popen[Any] | None = None
    try:
        wait_for("hostmaint server", lambda: "hardware-check-failed-runbook/hardware-check-failed"
                 in server_log.read_text(), server, server_log)
        site.pool_deployment = site.deployment("evacuate-host")
        with serve_log.open("w") as out:
            serve = subprocess.Popen([PY, "-m", "deployments.cli", "serve", "-i", str(inventory),
                                      "--approval-poll-seconds", "1"], cwd=ROOT, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def served() -> bool:
            try:
                dep = site.deployment("degraded-host")
            except httpx.HTTPStatusError:
                return False
            return dep.get("status") == "READY" and not dep.get("work_pool_name")

        wait_for("hostmaint serve", served, serve, serve_log, timeout=90)
        yield site
    finally:
        if serve is not None:
            stop(serve)
        assert stop(server) == 0, server_log.read_text()[-3000:]  # SIGTERM stops the server cleanly


def test_the_one_command_to_try_the_ui_serves_on_the_server_it_started(tmp_path: Path) -> None:
    """README: 'hostmaint server --simulated' from a shell with no Prefect settings sets up and serves every
    deployment on the server it started. Before, Prefect had read its settings when it was imported, the
    server's address set later went unseen, and setup started a temporary server of Prefect's own and
    died with a traceback."""
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HOSTMAINT_"))}
    env.update({"HOME": str(home), "PYTHONPATH": str(ROOT)})
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([PY, "-m", "deployments.cli", "server", "--simulated", "--port", str(port),
                                   "--home", str(tmp_path / "prefect")], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("hostmaint server --simulated", lambda: "serving every deployment" in log.read_text(), server, log,
                 timeout=240)
        deadline = time.monotonic() + 60
        while True:  # serve registers the deployments once it runs
            deployments = httpx.post(f"http://127.0.0.1:{port}/api/deployments/filter", json={}, timeout=30).json()
            names = {d["name"] for d in deployments}
            if {"evacuate-host", "patch-host", "return-host"} <= names or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert {"evacuate-host", "patch-host", "return-host"} <= names, (names, log.read_text()[-3000:])
        assert all("simulated" in d["tags"] for d in deployments), [(d["name"], d["tags"]) for d in deployments]
    finally:
        code = stop(server)
    text = log.read_text()
    assert "temporary server" not in text and "Traceback" not in text, text[-3000:]
    assert code == 0, text[-3000:]


def test_setup_made_the_server_ready(site: Site) -> None:
    """`hostmaint server -i`: loopback, analytics off, leases on disk; limits, automation, pool, deployments."""
    settings = site.get("/admin/settings")
    assert settings["server"]["analytics_enabled"] is False
    assert settings["server"]["concurrency"]["lease_storage"] == "prefect.server.concurrency.lease_storage.filesystem"
    assert settings["server"]["api"]["host"] == "127.0.0.1"
    for name, size in (("host:hv01", 1), ("maintenance:demo", 1), ("migrations:demo", 4)):
        assert site.limit(name)["limit"] == size
    automations = site.post("/automations/filter", {})
    [zombie] = [a for a in automations if a["name"].startswith("hostmaint: crash flow runs")]
    assert zombie["trigger"]["posture"] == "Proactive"
    assert zombie["actions"][0]["type"] == "change-flow-run-state" and zombie["actions"][0]["state"] == "CRASHED"
    assert site.get("/work_pools/hostmaint")["type"] == "process"
    assert site.pool_deployment["work_pool_name"] == "hostmaint"
    again = site.cli("setup", "-i", str(site.inventory))  # on a served site: changes nothing
    assert again.returncode == 0 and "(0 created or updated)" in again.stdout
    assert "evacuate-on-request/evacuate-host: left alone, 'hostmaint serve' serves it" in again.stdout


def test_serve_took_over_every_deployment(site: Site) -> None:
    for name in (*ENTRYPOINTS, "patch-window-demo"):
        dep = site.deployment(name)
        assert dep["work_pool_name"] is None, name  # served here, no longer waiting for a worker
        assert dep["status"] == "READY", name
    window = site.deployment("patch-window-demo")
    [schedule] = window["schedules"]
    assert schedule["schedule"]["timezone"] == "Asia/Tokyo" and "BYDAY=+2TU" in schedule["schedule"]["rrule"]
    assert schedule["parameters"]["cluster"] == "demo"


def test_the_scheduler_creates_the_windows_and_skips_excluded_dates(site: Site) -> None:
    """The server's own scheduler turns the schedule into runs: 22:00 Tokyo, none on an excluded date."""
    window = site.deployment("patch-window-demo")
    deadline = time.monotonic() + 90
    while not (runs := [r for r in site.runs_of(window["id"]) if r["state"]["type"] == "SCHEDULED"]):
        assert time.monotonic() < deadline, "the scheduler created no patch window run"
        time.sleep(1)
    tokyo = ZoneInfo("Asia/Tokyo")
    starts = sorted(datetime.fromisoformat(r["expected_start_time"]).astimezone(tokyo) for r in runs)
    for start in starts:
        assert (start.weekday(), start.hour, start.minute) == (1, 22, 0) and 8 <= start.day <= 14, start
        assert start.date().isoformat() not in ("2026-12-08", "2027-01-12"), f"excluded date scheduled: {start}"
    assert all(r["parameters"]["cluster"] == "demo" and r["parameters"]["window_minutes"] == 240 for r in runs)
    cfg, _ = load_windows(WINDOWS_FILE)
    expected = asyncio.run(RRuleSchedule(rrule=window_rrule(cfg), timezone=cfg.timezone).get_dates(
        n=len(starts), start=datetime.now(UTC)))
    assert starts == [d.astimezone(tokyo) for d in expected]


def test_degraded_event_starts_the_runbook_which_waits_for_approval(site: Site) -> None:
    dep = site.deployment("degraded-host")
    on_hv01 = {vm for vm, hosts in where(site.inventory).items() if "hv01" in hosts}
    sent = site.cli("event", "degraded", "hv01", "--reason", "ECC errors rising", "--severity", "warning",
                    "--source", "nagios")
    assert sent.returncode == 0, sent.stderr
    event_id = sent.stdout.split("(event ")[1].rstrip(")\n ")

    paused = site.wait_run(dep["id"], {"PAUSED"}, lambda r: r["parameters"].get("event_id") == event_id)
    assert paused["parameters"]["host"] == "hv01" and paused["parameters"]["reason"] == "ECC errors rising"
    states = HostStateStore(open_engine(f"sqlite:///{site.db}"))
    assert states.state("hv01") is HostState.CORDONED
    assert {vm for vm, hosts in where(site.inventory).items() if "hv01" in hosts} == on_hv01

    site.post(f"/flow_runs/{paused['id']}/resume",
              {"run_input": {"operator": "mallory", "approve": True, "comment": "replace the DIMM"}})
    done = site.wait_run(dep["id"], {"COMPLETED", "FAILED", "CRASHED"}, lambda r: r["id"] == paused["id"])
    assert done["state"]["type"] == "COMPLETED", done["state"]

    assert not any("hv01" in hosts for hosts in where(site.inventory).values())
    assert states.state("hv01") is HostState.CORDONED
    audit = AuditTrail(open_engine(f"sqlite:///{site.db}"))
    [approval] = [r for r in audit.records(host="hv01") if r.step == "approval"]
    assert approval.operator == "mallory" and approval.details["comment"] == "replace the DIMM"
    [incident] = [r for r in audit.records(host="hv01") if r.step == "incident"]
    assert incident.operator == "nagios" and incident.inputs["event_id"] == event_id
    assert {r.vm for r in audit.records() if r.step == "migrate" and r.operator == "mallory"} == on_hv01


def test_unknown_host_in_an_event_is_refused_by_the_cli(site: Site) -> None:
    sent = site.cli("event", "degraded", "hv99", "--reason", "x")
    assert sent.returncode == 2
    assert "unknown host 'hv99'" in sent.stderr


# --- the UI in headless Chromium ----------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


@dataclass
class Browser:
    """One headless Chromium page that can only reach the site, and what it tried to reach."""

    page: Any
    allowed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def open(self, url: str, marker: str, attempts: int = 4) -> None:
        """Go to ``url`` and wait until ``marker`` text shows; reload (up to ``attempts`` loads in all)
        while the app rendered nothing."""
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        for attempt in range(1, attempts + 1):
            try:
                self.page.goto(url, wait_until="domcontentloaded")
                self.page.get_by_text(marker).first.wait_for(timeout=30_000)
                return
            except (PlaywrightTimeout, PlaywrightError) as exc:
                # the single-page app renders nothing when an API call fails on a busy server (SQLite
                # "database is locked" -> 503), or when Chromium aborts its loads with ERR_NETWORK_CHANGED
                # because the lab tests beside this one add and remove network interfaces; a person
                # would reload, so do we
                self.log.append(f"{marker!r} did not show (load {attempt}): {str(exc).splitlines()[0]}")
                if attempt == attempts:
                    raise

    def shows(self, texts: Iterable[str], attempts: int = 4) -> None:
        """Wait until each of ``texts`` shows on the page as it is (exact), reloading it (up to ``attempts``
        loads in all) while they do not: a page the app reached by a click loads its data by API calls
        that can fail the same way as :meth:`open`'s."""
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        for attempt in range(1, attempts + 1):
            try:
                for text in texts:
                    self.page.get_by_text(text, exact=True).first.wait_for(timeout=30_000)
                return
            except (PlaywrightTimeout, PlaywrightError) as exc:
                self.log.append(f"{self.page.url} did not show it all (load {attempt}): {str(exc).splitlines()[0]}")
                if attempt == attempts:
                    raise
                self.page.reload(wait_until="domcontentloaded")


@contextmanager
def browser(site: Site, artifact: str) -> Iterator[Browser]:
    """Chromium (Debian's, via playwright) whose every request not to the site is aborted.

    The UI's page code reaches for an outside analytics host even with analytics off;
    nothing may leave 127.0.0.1. On failure the page and the browser log are saved.
    """
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (deployments/install-ui-test.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip playwright is not installed "
                                     "(deployments/install-ui-test.sh installs it)")
    origin = site.config.ui_url + "/"
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 1500})
            context.set_default_timeout(60_000)  # 2 cores shared with a server and a flow runner
            page = context.new_page()
            b = Browser(page)

            def only_loopback(route: Any) -> None:
                url = route.request.url
                if url.startswith(origin):
                    b.allowed.append(url)
                    route.continue_()
                else:
                    b.blocked.append(url)
                    route.abort()

            context.route("**/*", only_loopback)
            page.on("console", lambda msg: b.log.append(f"{msg.type}: {msg.text}"))
            page.on("requestfailed", lambda req: b.log.append(f"request failed: {req.url} {req.failure}"))
            page.on("response", lambda r: r.status >= 500 and b.log.append(f"{r.status}: {r.url}"))
            try:
                yield b
            except Exception:
                page.screenshot(path=str(ARTIFACTS / f"{artifact}-failure.png"), full_page=True)
                (ARTIFACTS / f"{artifact}-failure.log").write_text("\n".join(b.log))
                raise
        finally:
            chromium.close()
    assert b.allowed and all(u.startswith(origin) for u in b.allowed)


def test_ui_form_submits_a_dry_run_evacuation(site: Site) -> None:
    dep = site.deployment("evacuate-host")
    before = where(site.inventory)
    with browser(site, "evacuate-host-form") as b:
        b.open(f"{site.config.ui_url}/v2/deployments/deployment/{dep['id']}/run", "Move every VM off one host")
        page = b.page
        for label in ("Host", "Reason", "Operator", "Dry run (Optional)", "Approval required (Optional)"):
            page.get_by_text(label, exact=True).first.wait_for()
        _select(page, "Host", "hv02")  # the inventory's hosts, offered as a list
        page.get_by_label("Reason", exact=True).fill("UI dry run from the form")
        page.get_by_label("Operator", exact=True).fill("ui-tester")
        page.screenshot(path=str(ARTIFACTS / "evacuate-host-form.png"), full_page=True)
        _click_submit(b, site, dep["id"], "ui-tester")

    run = site.wait_run(dep["id"], {"COMPLETED", "FAILED", "CRASHED"},
                        lambda r: r["parameters"].get("request", {}).get("operator") == "ui-tester", timeout=90)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    request = run["parameters"]["request"]
    assert (request["host"], request["reason"], request["dry_run"]) == ("hv02", "UI dry run from the form", True)
    assert where(site.inventory) == before  # a dry run moves nothing
    (ARTIFACTS / "evacuate-host-form.json").write_text(json.dumps(
        {"flow_run": run["id"], "parameters": run["parameters"], "blocked_requests": sorted(set(b.blocked)),
         "browser_log": b.log}, indent=2))


def _select(page: Any, field: str, value: str) -> list[str]:
    """Choose ``value`` in the form's list ``field``; return every choice it offered."""
    page.get_by_role("button", name=f"Select {field}").click()
    offered = [o.inner_text() for o in page.get_by_role("option").all()]
    page.get_by_role("option", name=value, exact=True).click()
    return offered


def _submit_form(b: Browser, site: Site, deployment: str, marker: str, host: str, operator: str,
                 switches: tuple[int, ...] = ()) -> list[str]:
    """Open ``deployment``'s run form, pick ``host``, name the operator, flip ``switches`` (by position), submit."""
    dep = site.deployment(deployment)
    b.open(f"{site.config.ui_url}/v2/deployments/deployment/{dep['id']}/run", marker)
    page = b.page
    offered = _select(page, "Host", host)
    page.get_by_label("Operator", exact=True).fill(operator)
    reason = page.get_by_label("Reason", exact=True)  # required here; "Reason (Optional)" has a default
    if reason.count():
        reason.fill(f"operator path {operator}")
    for index in switches:
        page.get_by_role("switch").nth(index).click()
    _click_submit(b, site, dep["id"], operator)
    return offered


def _click_submit(b: Browser, site: Site, deployment_id: str, operator: str) -> None:
    """Submit the run form; on a loaded machine the server can answer 503 ("database is locked") and the
    form stays: a person clicks again, so do we (at most three times), unless the run exists after all."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for attempt in range(3):
        b.page.get_by_role("button", name="Submit").click()
        try:
            b.page.wait_for_url(lambda url: "/run" not in url, timeout=30_000)
            return
        except PlaywrightTimeoutError:
            b.page.screenshot(path=str(ARTIFACTS / f"form-still-open-{operator}-{attempt}.png"))
            if any(r["parameters"].get("request", {}).get("operator") == operator
                   for r in site.runs_of(deployment_id)):
                return
    raise AssertionError(f"the form for {operator} was never submitted")


def test_ui_operator_path_dry_run_approved_evacuation_and_the_way_back(site: Site) -> None:
    """What an operator does in the UI: pick a host from the form's list, dry run, read the plan on the run
    page; evacuate for real with approval, approve in the Resume dialog, read progress and result; then
    return-host brings the host back with its VMs."""
    evacuate = site.deployment("evacuate-host")
    states = HostStateStore(open_engine(f"sqlite:///{site.db}"))
    # VMs an earlier test's evacuation put on hv02 belong elsewhere (their recorded origin): the way
    # back returns each VM to where it came from, so those do not come back to hv02
    elsewhere = {vm for host in ("hv01", "hv03", "hv04") for vm in states.origins(host)}
    home = {vm for vm, hosts in where(site.inventory).items() if "hv02" in hosts}
    with browser(site, "operator-path") as b:
        page = b.page
        offered = _submit_form(b, site, "evacuate-host", "Move every VM off one host", "hv02", "op-dry")
        assert offered == ["hv01", "hv02", "hv03", "hv04"]  # a host not in the inventory cannot be typed
        dry = site.wait_run(evacuate["id"], {"COMPLETED", "FAILED", "CRASHED"},
                            lambda r: r["parameters"]["request"].get("operator") == "op-dry", timeout=120)
        assert dry["state"]["type"] == "COMPLETED", dry["state"]
        assert dry["name"] == "evacuate hv02 (dry run, simulated)"
        assert {"host:hv02", "cluster:demo", "simulated"} <= set(dry["tags"])
        # the plan is on the run the form opened, not one subflow away
        b.open(f"{site.config.ui_url}/v2/runs/flow-run/{dry['id']}", dry["name"])
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("plan for hv02").first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        b.shows(sorted(home))
        page.screenshot(path=str(ARTIFACTS / "operator-path-plan.png"), full_page=True)
        assert {vm for vm, hosts in where(site.inventory).items() if "hv02" in hosts} == home  # nothing moved

        # for real, with approval: dry run off (switch 0), approval required on (switch 1)
        _submit_form(b, site, "evacuate-host", "Move every VM off one host", "hv02", "op-real", switches=(0, 1))
    paused = site.wait_run(evacuate["id"], {"PAUSED"},
                           lambda r: r["parameters"]["request"].get("operator") == "op-real", timeout=120)
    try:
        _answer_in_the_ui(site, paused)
    finally:
        if site.get(f"/flow_runs/{paused['id']}")["state"]["type"] == "PAUSED":
            site.post(f"/flow_runs/{paused['id']}/resume",
                      {"run_input": {"operator": "test-cleanup", "approve": False, "comment": "UI test failed"}})
    done = site.wait_run(evacuate["id"], {"COMPLETED", "FAILED", "CRASHED"}, lambda r: r["id"] == paused["id"],
                         timeout=120)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert not any("hv02" in hosts for hosts in where(site.inventory).values())
    with browser(site, "operator-path-result") as b:
        page = b.page
        b.open(f"{site.config.ui_url}/v2/runs/flow-run/{done['id']}", "evacuate hv02 (simulated)")
        page.get_by_role("tab", name="Artifacts").click()
        for card in ("plan for hv02", "drain:", "evacuate hv02"):
            page.get_by_text(card).first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "operator-path-result.png"), full_page=True)

        # the way back: return-host, from its form
        back = site.deployment("return-host")
        _submit_form(b, site, "return-host", "End a host's evacuation", "hv02", "op-return")
    returned = site.wait_run(back["id"], {"COMPLETED", "FAILED", "CRASHED"},
                             lambda r: r["parameters"]["request"].get("operator") == "op-return", timeout=120)
    assert returned["state"]["type"] == "COMPLETED", returned["state"]
    assert {vm for vm, hosts in where(site.inventory).items() if "hv02" in hosts} == home - elsewhere
    assert set(where(site.inventory)) == set(ALL_VMS) and all(len(h) == 1 for h in where(site.inventory).values())
    assert states.state("hv02") is HostState.ACTIVE
    audit = AuditTrail(open_engine(f"sqlite:///{site.db}"))
    [approval] = [r for r in audit.records(host="hv02") if r.step == "approval"]
    assert approval.operator == "ui-approver" and approval.trigger.value == "ui"


def test_ui_resume_dialog_approves_the_hardware_runbook(site: Site) -> None:
    """A failed hardware check → the runbook pauses → an approver answers in the UI's Resume dialog."""
    dep = site.deployment("hardware-check-failed")
    sent = site.cli("event", "hardware-failed", "hv04", "--check", "memtest", "--detail", "DIMM B2")
    assert sent.returncode == 0, sent.stderr
    event_id = sent.stdout.split("(event ")[1].rstrip(")\n ")
    paused = site.wait_run(dep["id"], {"PAUSED"}, lambda r: r["parameters"].get("event_id") == event_id)
    states = HostStateStore(open_engine(f"sqlite:///{site.db}"))
    assert states.state("hv04") is HostState.CORDONED  # at once, before anyone answered

    try:
        _answer_in_the_ui(site, paused)
    finally:
        # A failure here must not leave the run paused: it holds host and cluster locks that would
        # make every later test on this cluster wait.
        if site.get(f"/flow_runs/{paused['id']}")["state"]["type"] == "PAUSED":
            site.post(f"/flow_runs/{paused['id']}/resume",
                      {"run_input": {"operator": "test-cleanup", "approve": False, "comment": "UI test failed"}})

    done = site.wait_run(dep["id"], {"COMPLETED", "FAILED", "CRASHED"}, lambda r: r["id"] == paused["id"])
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert not any("hv04" in hosts for hosts in where(site.inventory).values())
    record = states.get("hv04")
    assert (record.state, record.reason) == (HostState.CORDONED, "hardware check failed: memtest: DIMM B2")
    audit = AuditTrail(open_engine(f"sqlite:///{site.db}"))
    [approval] = [r for r in audit.records(host="hv04") if r.step == "approval"]
    assert approval.operator == "ui-approver" and approval.details["approve"] is True
    assert approval.details["comment"] == "approved in the UI"


def _answer_in_the_ui(site: Site, paused: dict[str, Any]) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    with browser(site, "resume-dialog") as b:
        b.open(f"{site.config.ui_url}/v2/runs/flow-run/{paused['id']}", paused["name"])
        page = b.page
        # the run's ⋮ menu is the right-most button of the header row
        header = [x for x in page.get_by_role("button").all()
                  if (box := x.bounding_box()) and box["y"] < 80 and box["x"] > 1000]
        assert header, "no run menu button in the header"
        header[-1].click()
        page.get_by_role("menuitem", name="Resume").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Who decides; written into the audit trail.").wait_for()
        page.get_by_label("Your name", exact=True).fill("ui-approver")
        page.get_by_label("Comment (Optional)", exact=True).fill("approved in the UI")
        dialog.get_by_role("switch").click()
        page.screenshot(path=str(ARTIFACTS / "resume-approval-dialog.png"))
        # On a loaded machine the first click can land before the form is ready: click again, at most
        # three times, until the dialog closes (the run's state below is what the test judges).
        for attempt in range(3):
            dialog.get_by_role("button", name="Resume").click()
            try:
                dialog.wait_for(state="hidden", timeout=20_000)
                break
            except PlaywrightTimeoutError:
                page.screenshot(path=str(ARTIFACTS / f"resume-dialog-still-open-{attempt}.png"))
        else:
            raise AssertionError("the Resume dialog never closed")


# --- a flow killed mid-drain -------------------------------------------------------------------------------------

EVACUATE = ("import sys; from flows.evacuate_host import evacuate_host; "
            "r = evacuate_host(host=sys.argv[1], inventory=sys.argv[2], operator=sys.argv[3], lock_wait_s=None); "
            "print('OUTCOME', r.outcome.value, len(r.migrations))")


def test_flow_killed_mid_drain_is_finished_by_the_next_run(site: Site) -> None:
    """Kill the process mid-drain; the next run finds the host draining, re-discovers, finishes.

    No VM moves twice, none is lost, and the dead run's locks come back (lease expiry)."""
    fleet = make_fleet(site.workdir / "slow", time_scale=0.6)  # ~2-4 s per migration
    db = site.workdir / "kill.db"
    env = {**site.env, "HOSTMAINT_DB": str(db), "HOSTMAINT_INVENTORY": str(fleet)}
    host = "hv03"
    on_host = {vm for vm, hosts in where(fleet).items() if host in hosts}
    assert len(on_host) == 3
    states = HostStateStore(open_engine(f"sqlite:///{db}"))
    # the setup's automation waits 90 s; 45 s (heartbeats every 30 s) lets this test see it act
    with temporary_settings({PREFECT_API_URL: site.api}):
        ensure_zombie_automation(within_s=45)

    first = subprocess.Popen([PY, "-c", EVACUATE, host, str(fleet), "first"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        moved = on_host - {vm for vm, hosts in where(fleet).items() if host in hosts}
        if moved and states.state(host) is HostState.DRAINING:
            break
        assert first.poll() is None, f"the flow ended before it was killed: {first.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "the drain never started"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)

    assert states.state(host) is HostState.DRAINING
    left = {vm for vm, hosts in where(fleet).items() if host in hosts}
    assert left and left < on_host, "killed too late or too early to be mid-drain"
    assert site.limit(f"host:{host}")["active_slots"] == 1  # the dead run's lease still holds the host

    second = subprocess.run([PY, "-c", EVACUATE, host, str(fleet), "second"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "OUTCOME ok" in second.stdout

    placement = where(fleet)
    assert set(placement) == ALL_VMS and all(len(h) == 1 for h in placement.values()), placement
    assert not any(host in hosts for hosts in placement.values())
    assert json.loads((fleet.parent / "fleet-state.json").read_text())["lost"] == []
    audit = AuditTrail(open_engine(f"sqlite:///{db}"))
    moves = [r for r in audit.records() if r.step == "migrate" and r.outcome is StepOutcome.OK]
    assert sorted(r.vm for r in moves) == sorted({r.vm for r in moves}), "a VM was moved twice"
    assert {r.vm for r in moves if r.operator == "second"} == left  # only what was still there
    [resumed] = [r for r in audit.records(host=host) if r.step == "cordon" and r.operator == "second"]
    assert resumed.details.get("resumed_from") == "draining"
    assert states.state(host) is HostState.DRAINED
    for name in (f"host:{host}", "maintenance:demo", "migrations:demo"):
        assert site.limit(name)["active_slots"] == 0, name
    # the dead run does not stay "Running": the zombie-run automation marked it Crashed
    evacuations = site.post("/flow_runs/filter", {"flows": {"name": {"any_": ["evacuate-host"]}}, "limit": 50})
    [dead] = [r for r in evacuations if r["parameters"].get("operator") == "first"]
    deadline = time.monotonic() + 60
    while dead["state"]["type"] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
        dead = site.get(f"/flow_runs/{dead['id']}")
    assert dead["state"]["type"] == "CRASHED", dead["state"]
