"""Real Prometheus and Alertmanager servers on loopback ports, for the monitoring tests.

Prometheus scrapes a tiny exporter run here (``Flag.value``: raised and cleared by tests) and
evaluates every second: ``HostOnFire`` always fires for hv01, ``StorageDegraded`` always fires for
cluster ``demo``, ``Toggle`` fires for hv02 while the flag is 1. Alertmanager runs without a cluster
port and saves its state every 5 s.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
MISSING = ("Prometheus/Alertmanager binaries absent: apt-get install prometheus prometheus-alertmanager "
           "(scripts/install-system.sh installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flag:
    """The exporter's one metric: ``hostmaint_test_flag{instance="hv02"}``."""

    value = 1


def _exporter() -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = f'hostmaint_test_flag{{instance="hv02"}} {Flag.value}\n'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def until(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclasses.dataclass
class Servers:
    prometheus: str
    alertmanager: str


@contextmanager
def running_servers(work: Path) -> Iterator[Servers]:
    """Start both servers (PROMETHEUS and ALERTMANAGER must be found) and stop them after."""
    assert PROMETHEUS and ALERTMANAGER, MISSING
    exporter, exporter_port = _exporter()
    (work / "rules.yml").write_text(
        "groups:\n- name: hostmaint-test\n  interval: 1s\n  rules:\n"
        "  - alert: HostOnFire\n    expr: vector(1)\n    labels: {instance: hv01, severity: critical}\n"
        "  - alert: StorageDegraded\n    expr: vector(1)\n    labels: {cluster: demo}\n"
        "  - alert: Toggle\n    expr: hostmaint_test_flag == 1\n")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yml]\n"
        "scrape_configs:\n- job_name: flag\n  honor_labels: true\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    (work / "alertmanager.yml").write_text("route: {receiver: none}\nreceivers: [{name: none}]\n")
    prom_port, am_port = free_port(), free_port()
    procs = [
        subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                          f"--storage.tsdb.path={work / 'tsdb'}", "--storage.tsdb.retention.time=1h",
                          f"--web.listen-address=127.0.0.1:{prom_port}"],
                         stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("w")),
        subprocess.Popen([ALERTMANAGER, f"--config.file={work / 'alertmanager.yml'}",
                          f"--storage.path={work / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
                          "--cluster.listen-address=", f"--web.external-url=http://127.0.0.1:{am_port}/",
                          "--data.maintenance-interval=5s"],
                         stdout=subprocess.DEVNULL, stderr=(work / "alertmanager.log").open("w")),
    ]
    try:
        s = Servers(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}")
        until("prometheus ready", lambda: httpx.get(f"{s.prometheus}/-/ready").status_code == 200)
        until("alertmanager ready", lambda: httpx.get(f"{s.alertmanager}/-/ready").status_code == 200)
        until("HostOnFire firing", lambda: httpx.get(f"{s.prometheus}/api/v1/query", params={
            "query": 'ALERTS{alertstate="firing",alertname="HostOnFire"}'}).json()["data"]["result"])
        yield s
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        exporter.shutdown()


