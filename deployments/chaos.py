"""The Prefect side of the chaos campaign (hostmaint/lab/chaos.py): a server on loopback, and a
process worker that runs the patch-host deployment from this source tree.

The campaign's engine is core code and imports no Prefect; it drives Prefect through this class
(:class:`hostmaint.lab.chaos.PrefectSide`). ``hostmaint lab chaos`` and ``benchmarks/chaos.py``
hand it over.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deployments.server import RunningServer, ServerConfig, prefect_executable, server_env, start_server
from hostmaint.lab import faults

ROOT = Path(__file__).resolve().parents[1]  # the source tree the worker runs flows from
POOL = "hostmaint-chaos"
DEPLOYMENT = "chaos-patch-host"


@contextmanager
def _api(url: str) -> Iterator[None]:
    """This process's Prefect client talks to the campaign's server, whatever settings it loaded before
    (a test session's, say)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


class FlowRun:
    """A run of the patch-host deployment, watched through the API."""

    def __init__(self, run_id: str, api_url: str) -> None:
        self.run_id = run_id
        self.api_url = api_url
        self.final: str | None = None
        self.message = ""

    def poll(self) -> int | None:
        from prefect.client.orchestration import get_client

        try:
            with _api(self.api_url), get_client(sync_client=True) as client:
                state = client.read_flow_run(self.run_id).state  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the server restarting (a fault of the campaign): ask again later
            return None
        if state is None or not state.is_final():
            return None
        self.final, self.message = state.type.value, state.message or ""
        return 0 if state.is_completed() else 1

    def describe(self) -> str:
        return f"flow run {self.run_id}: {self.final or 'not final'} {self.message}".strip()


class LocalPrefect:
    """A Prefect server on 127.0.0.1 (SQLite under the campaign's output), a process work pool and one
    worker with the campaign's hostmaint environment."""

    def __init__(self) -> None:
        self.server: RunningServer | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.out = Path()
        self.deployment_id: str | None = None
        self.inventory = ""

    def start(self, out: Path, port: int, env: dict[str, str]) -> dict[str, str]:
        cfg = ServerConfig(home=out / "prefect", port=port)
        self.out = out
        self.server = start_server(cfg, timeout_s=120, log=out / "prefect-server.log")
        self.env = server_env(cfg, env)
        self.inventory = env.get("HOSTMAINT_INVENTORY", "")
        return dict(self.env)

    def restart_server(self) -> None:
        assert self.server is not None
        self.server.process.kill()
        self.server.process.wait(30)
        time.sleep(1)
        self.server = start_server(self.server.config, timeout_s=120, log=self.out / "prefect-server.log")

    def start_worker(self) -> None:
        if self.deployment_id is None:
            from prefect import Flow

            from deployments.server import ensure_work_pool

            with _api(self.env["PREFECT_API_URL"]):
                ensure_work_pool(POOL)
                flow = Flow.from_source(source=str(ROOT), entrypoint="flows/patch_host.py:patch_host")
                self.deployment_id = str(flow.deploy(  # type: ignore[union-attr]
                    name=DEPLOYMENT, work_pool_name=POOL, build=False, push=False, print_next_steps=False))
        if self.worker is not None and self.worker.poll() is None:
            return
        env = {**self.env, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p),
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        with (self.out / "worker.log").open("ab") as log:
            self.worker = subprocess.Popen([prefect_executable(), "worker", "start", "--pool", POOL, "--type",
                                            "process", "--limit", "2"], cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)

    def kill_worker(self) -> list[int]:
        if self.worker is None or self.worker.poll() is not None:
            return []
        killed = faults.kill_process_tree(self.worker.pid)
        self.worker.wait(30)
        return killed

    def submit(self, host: str, reason: str, operator: str) -> FlowRun:
        from prefect.client.orchestration import get_client

        self.start_worker()  # the first worker round deploys and starts it
        assert self.deployment_id is not None
        with _api(self.env["PREFECT_API_URL"]), get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(self.deployment_id, parameters={  # type: ignore[arg-type]
                "host": host, "reason": reason, "operator": operator, "inventory": self.inventory})
        return FlowRun(str(run.id), self.env["PREFECT_API_URL"])

    def stop(self) -> None:
        """Idempotent, and safe after a failed start."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                faults.kill_process_tree(self.worker.pid)
        if self.server is not None:
            self.server.stop()
