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
from typing import Any, cast

import pytest
import yaml
from pydantic import SecretStr


class Receiver:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append(json.loads(body or b"{}"))
                outer.paths.append(self.path)
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


# --- Slack and e-mail through Prefect's own notification blocks, to receivers on loopback only -------------


class SmtpSink:
    """An SMTP server on loopback that keeps every message it is given (enough SMTP for Apprise's mailer)."""

    def __init__(self) -> None:
        import socketserver

        self.messages: list[dict[str, Any]] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                def say(*lines: str) -> None:
                    self.wfile.write("".join(f"{line}\r\n" for line in lines).encode())
                    self.wfile.flush()

                say("220 sink ESMTP")
                mail: dict[str, Any] = {"to": []}
                while line := self.rfile.readline().decode(errors="replace").rstrip("\r\n"):
                    verb = line[:4].upper()
                    if verb == "EHLO":
                        say("250-sink", "250 8BITMIME")
                    elif verb == "MAIL":
                        mail = {"from": line[10:], "to": []}
                        say("250 OK")
                    elif verb == "RCPT":
                        mail["to"].append(line[8:])
                        say("250 OK")
                    elif verb == "DATA":
                        say("354 end with .")
                        body = []
                        while (text := self.rfile.readline().decode(errors="replace")) not in (".\r\n", ""):
                            body.append(text[1:] if text.startswith("..") else text)
                        outer.messages.append({**mail, "data": "".join(body)})
                        say("250 queued")
                    elif verb == "QUIT":
                        say("221 bye")
                        return
                    else:
                        say("250 OK" if verb in ("HELO", "RSET", "NOOP") else "502 not implemented")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        import email
        from email import policy

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                msg = email.message_from_string(m["data"], policy=policy.default)
                text = f"Subject: {msg['subject']}\n" + "\n".join(
                    str(part.get_content()) for part in msg.walk() if part.get_content_type() == "text/plain")
                if needle in text:
                    return text
            time.sleep(0.2)
        raise AssertionError(f"no mail with {needle!r}; got {self.messages}")


def test_failures_reach_chat_and_mail_through_prefects_blocks_on_loopback(fleet: Path, receiver: Receiver) -> None:
    """The automation, run by the Prefect server, renders the message, loads the block and sends: a
    Slack-compatible incoming webhook (Prefect's MattermostWebhook block: Slack's payload, any host) and
    e-mail (Prefect's Apprise block with a mailto:// URL) both get the failure, on loopback."""
    from prefect import flow
    from prefect.blocks.notifications import MattermostWebhook, SlackWebhook

    from deployments.notifications import ensure_notifications

    sink = SmtpSink()
    port = int(receiver.url.split(":")[2].split("/")[0])
    MattermostWebhook(hostname="127.0.0.1", port=port, secure=False, token=SecretStr("hostmaint-chat"),
                      botname="hostmaint").save("chat", overwrite=True)
    SlackWebhook(url=SecretStr(f"mailto://127.0.0.1:{sink.port}?from=hostmaint@example.invalid"
                               "&to=oncall@example.invalid&mode=insecure")).save("oncall-mail", overwrite=True)
    data = yaml.safe_load(fleet.read_text())
    data["notifications"] = {"blocks": ["mattermost-webhook/chat", "slack-webhook/oncall-mail"], "on": ["failed"]}
    fleet.write_text(yaml.safe_dump(data))
    assert len(ensure_notifications(fleet)) == 1

    @flow(name="evacuate-host")
    def evacuation() -> None:
        raise RuntimeError("hv07: pre-drain hook lb-drain failed (exit 3: backend busy)")

    with pytest.raises(RuntimeError):
        evacuation()
    chat = receiver.wait_for("hv07: pre-drain hook lb-drain failed")
    assert receiver.paths[-1] == "/hooks/hostmaint-chat"  # where a Slack-compatible server takes webhooks
    assert chat["username"] == "hostmaint" and "evacuate-host" in chat["text"] and "Failed" in chat["text"]
    mail = sink.wait_for("hv07: pre-drain hook lb-drain failed (exit 3: backend busy)")
    assert mail.startswith("Subject: hostmaint: evacuate-host ") and "Failed" in mail.splitlines()[0]
    assert sink.messages[-1]["to"] == ["<oncall@example.invalid>"]


def test_the_slack_block_posts_slacks_payload(monkeypatch: pytest.MonkeyPatch, receiver: Receiver,
                                             prefect_server: None) -> None:
    """Prefect's SlackWebhook block takes a hooks.slack.com URL and Apprise posts only to Slack's host,
    so it cannot be pointed at a receiver here through the server; in this process Apprise's Slack
    endpoint is moved to loopback (and every other request refused), and the block sends a
    notification as the automation hands it over (subject, body)."""
    import requests
    from apprise.plugins.slack import NotifySlack
    from prefect.blocks.notifications import SlackWebhook

    base = receiver.url.rsplit("/", 1)[0]
    monkeypatch.setattr(NotifySlack, "webhook_url", f"{base}/services")
    post = requests.post

    def loopback_only(url: str, *args: Any, **kwargs: Any) -> Any:
        assert url.startswith(base), f"refused off-machine request to {url}"
        return post(url, *args, **kwargs)

    monkeypatch.setattr(requests, "post", loopback_only)
    SlackWebhook(url=SecretStr("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX")
                 ).save("oncall", overwrite=True)
    block = cast(SlackWebhook, SlackWebhook.load("oncall"))
    block.notify(subject="hostmaint: patch-window w-42 Failed",
                 body="patch-window run w-42 ended Failed: 2 hosts failed: hv01 (verify failed)")
    (posted,) = receiver.posts
    assert receiver.paths == ["/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"]
    # Slack's incoming-webhook JSON: an attachment titled with the subject, the body its text
    (attachment,) = posted["attachments"]
    assert attachment["title"] == "hostmaint: patch-window w-42 Failed"
    assert attachment["text"] == "patch-window run w-42 ended Failed: 2 hosts failed: hv01 (verify failed)"


def test_every_hostmaint_flow_is_watched() -> None:
    import re

    from deployments.notifications import FLOWS

    flows = Path(__file__).resolve().parents[2] / "flows"
    names = {name for f in flows.rglob("*.py") for name in re.findall(r'@flow\(name="([^"]+)"', f.read_text())}
    assert names and names == set(FLOWS)
