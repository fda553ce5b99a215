"""Notifications (deployments/notifications.py): automations created by setup's notification step
send through a Prefect custom-webhook block to a local receiver when a run fails, waits for
approval, or a window ends. Flows named as hostmaint's stand in for them (the automations match
runs by flow name and state type)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml


class Receiver:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for post in self.posts:
                if needle in json.dumps(post):
                    return post
            time.sleep(0.2)
        raise AssertionError(f"no notification with {needle!r}; got {self.posts}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_setup_notifies_failures_approvals_and_window_ends(fleet: Path, receiver: Receiver) -> None:
    from prefect import flow
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.flow_runs import pause_flow_run

    from deployments.notifications import ensure_notifications
    from hostmaint.errors import InputError

    CustomWebhookNotificationBlock(name="ops-hook", url=receiver.url,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("ops-hook",
                                                                                                 overwrite=True)
    data = yaml.safe_load(fleet.read_text())
    data["notifications"] = {"blocks": ["custom-webhook/missing-hook"]}
    fleet.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=r"notifications.blocks\[0\]: no Prefect block 'custom-webhook/missing-hook'"):
        ensure_notifications(fleet)
    data["notifications"] = {"blocks": ["custom-webhook/ops-hook"]}
    fleet.write_text(yaml.safe_dump(data))
    assert len(ensure_notifications(fleet)) == 3
    assert len(ensure_notifications(fleet)) == 3  # again: replaced, not doubled

    @flow(name="patch-window")
    def window() -> None:
        raise RuntimeError("2 hosts failed: hv01 (verify failed), hv03 (pre-drain hook lb failed)")

    @flow(name="degraded-host-runbook")
    def runbook() -> None:
        pause_flow_run(timeout=2, poll_interval=1)

    with pytest.raises(RuntimeError):
        window()
    post = receiver.wait_for("hv03 (pre-drain hook lb failed)")
    assert "Failed" in post["subject"] and not post["body"].endswith("None")  # no UI url here: no link
    with pytest.raises(Exception):  # noqa: B017 - nobody approves: the pause times out
        runbook()
    receiver.wait_for("waits for approval")

    # a real window whose first host fails its update: the summary names every host and its outcome
    from flows.patch_window import patch_window
    from hostmaint.drivers.memory import SimulatedFleet
    from hostmaint.models import Trigger

    state = SimulatedFleet.load(fleet.parent / "fleet-state.json")
    for host in state.packages:
        state.packages[host].fail_update = True
    state.save()
    patch_window(cluster="demo", window_id="w-notify", max_failed_hosts=0, operator="sched",
                 inventory=str(fleet), trigger=Trigger.TEST)
    post = receiver.wait_for("patch window w-notify on demo:")
    assert "3 skipped" in post["body"] and "1 failed" in post["body"] and "(1 failed)" in post["subject"]
    assert "hv01: failed (failed) hv01: dnf update failed" in post["body"]
    assert post["body"].count("\n- hv0") == 4
    assert all("hostmaint" in p["subject"] for p in receiver.posts)
