"""`hostmaint server`, `setup` and `serve` talk to the server they are told of, whatever was imported first.

Prefect reads its settings once, when it is first imported; `hostmaint server` imports it while starting
the server, so exporting PREFECT_API_URL into os.environ afterwards changed nothing: its `setup` (with
`-i`) and everything `--simulated` serves went to a temporary server of their own (or to the server an
old PREFECT_API_URL named), and the UI of the server it had started showed no limit and no deployment.
No server is started here: the commands' Prefect work is replaced by functions that note which API
they would have used.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deployments import serve as serve_module
from deployments import server as server_module
from deployments.cli import app

STALE = "http://127.0.0.1:9/api"  # what an old export says: not the server the command starts or names
runner = CliRunner()


class _Exited:
    """A server process that has already ended (``hostmaint server`` waits on it, then stops it)."""

    returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def poll(self) -> int:
        return 0


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The API URL that setup and serve saw, with a stale one in Prefect's settings beforehand."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen: dict[str, Any] = {}

    def start_server(cfg: server_module.ServerConfig, **_: Any) -> server_module.RunningServer:
        return server_module.RunningServer(cfg, _Exited(), tmp_path / "server.log")  # type: ignore[arg-type]

    def setup(inventory: object, **_: Any) -> server_module.SetupReport:
        seen["setup"] = PREFECT_API_URL.value()
        return server_module.SetupReport(limits=[], automation_id="-")

    def serve_deployments(*_: Any, **__: Any) -> None:
        seen["serve"] = PREFECT_API_URL.value()

    monkeypatch.setattr(server_module, "start_server", start_server)
    monkeypatch.setattr(server_module, "setup", setup)
    monkeypatch.setattr(serve_module, "serve_deployments", serve_deployments)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # the command's SIGTERM handler stays out of pytest
    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "hostmaint.db"))
    environ = dict(os.environ)
    try:
        with temporary_settings(updates={PREFECT_API_URL: STALE}):
            yield seen
    finally:
        os.environ.clear()
        os.environ.update(environ)


def test_server_sets_up_the_server_it_started(seen: dict[str, Any], tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--port", "4391", "--home", str(tmp_path / "p"), "-i", "inventory.yaml"])
    assert result.exit_code == 0, result.output
    assert seen["setup"] == "http://127.0.0.1:4391/api"


def test_server_simulated_serves_on_the_server_it_started(seen: dict[str, Any], tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--port", "4391", "--home", str(tmp_path / "p"), "--simulated",
                                 "--simulated-home", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    assert seen == {"setup": "http://127.0.0.1:4391/api", "serve": "http://127.0.0.1:4391/api"}


def test_setup_and_serve_use_the_api_url_they_are_given(seen: dict[str, Any], tmp_path: Path) -> None:
    url = "http://127.0.0.1:4392/api"
    assert runner.invoke(app, ["setup", "--api-url", url, "-i", "inventory.yaml"]).exit_code == 0
    result = runner.invoke(app, ["serve", "--api-url", url, "--simulated", "--simulated-home", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    assert seen == {"setup": url, "serve": url}


def test_a_port_in_use_is_refused_before_a_server_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 'hostmaint server --port P' with a server already on P said "Prefect server up" (the other one
    # answered the health check), its own server exited ("already in use"), and the command exited 0
    import socket
    import subprocess

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a server was started on a port in use")

    monkeypatch.setattr(subprocess, "Popen", no_server)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = server_module.ServerConfig(home=tmp_path / "p", port=port)
        with pytest.raises(server_module.ServerError, match=f"port {port} on 127.0.0.1 is in use"):
            server_module.start_server(cfg)
        result = runner.invoke(app, ["server", "--port", str(port), "--home", str(tmp_path / "p")])
        assert result.exit_code == 1 and "is in use" in result.output, result.output
    assert not server_module.port_taken("127.0.0.1", port)


def test_a_server_that_does_not_answer_is_named_with_what_to_do(tmp_path: Path) -> None:
    # 'hostmaint setup' against a server that is down said only "error: [Errno 111] Connection refused"
    import socket

    from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet

    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again below: nothing listens there
    environ = dict(os.environ)
    try:
        result = runner.invoke(app, ["setup", "--api-url", f"http://127.0.0.1:{port}/api", "-i", str(inventory)])
    finally:
        os.environ.clear()
        os.environ.update(environ)
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert f"cannot reach the Prefect server at http://127.0.0.1:{port}" in said and "hostmaint server" in said
