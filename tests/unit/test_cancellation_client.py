"""A run's cancellation watch asks the server every POLL_S with one client, not a client per ask.

No Prefect server: ``get_client`` is replaced by a factory of fake clients that count what is made,
asked and closed. (That a real watch sees a real cancel is tests/flows/test_cancel_runs.py's.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import prefect.client.orchestration
import pytest

from tasks import cancellation

RUN = "6a1f5f3e-1111-4222-8333-944444444444"


class FakeClient:
    def __init__(self, made: list[FakeClient], state: str, fail: threading.Event) -> None:
        self.state, self.fail = state, fail
        self.entered = self.exited = False
        self.asked = 0
        made.append(self)

    def __enter__(self) -> FakeClient:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited = True

    def read_flow_run(self, run_id: Any) -> Any:
        self.asked += 1
        if self.fail.is_set():
            self.fail.clear()
            raise ConnectionError("the server went away")
        return SimpleNamespace(state=SimpleNamespace(type=SimpleNamespace(value=self.state), message="m"))

    def read_flow_run_states(self, run_id: Any) -> list[Any]:
        self.asked += 1
        return [SimpleNamespace(type=SimpleNamespace(value="CANCELLING"), message="cancelled by kim")]


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    box = SimpleNamespace(made=[], state="RUNNING", fail=threading.Event())
    monkeypatch.setattr(prefect.client.orchestration, "get_client",
                        lambda sync_client=False: FakeClient(box.made, box.state, box.fail))
    monkeypatch.setattr(cancellation, "POLL_S", 0.02)
    yield box


def _wait(what: str, done: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_watch_asks_every_time_with_one_client_and_closes_it_when_the_run_ends(clients: SimpleNamespace) -> None:
    with cancellation.watching(RUN) as cancel:
        _wait("ten asks", lambda: clients.made and clients.made[0].asked >= 10)
        assert not cancel.is_set()
    _wait("the watch to close its client", lambda: clients.made[0].exited)
    assert len(clients.made) == 1 and clients.made[0].entered


def test_a_failed_ask_drops_the_client_and_the_next_ask_makes_a_new_one(clients: SimpleNamespace) -> None:
    with cancellation.watching(RUN):
        _wait("a first client", lambda: clients.made and clients.made[0].asked >= 2)
        clients.fail.set()
        _wait("a second client after the failure", lambda: len(clients.made) >= 2 and clients.made[1].asked >= 2)
        assert clients.made[0].exited  # the broken one was closed
    _wait("the second client closed", lambda: clients.made[1].exited)
    assert len(clients.made) == 2


def test_a_watch_that_sees_the_cancel_names_who_asked_with_the_same_client(clients: SimpleNamespace) -> None:
    clients.state = "CANCELLING"
    with cancellation.watching(RUN) as cancel:
        _wait("the cancel", cancel.is_set)
    assert cancel.by == "kim"
    assert len(clients.made) == 1 and clients.made[0].asked == 2  # the state, then its history


def test_an_ask_without_a_held_client_makes_and_closes_its_own(clients: SimpleNamespace) -> None:
    assert cancellation.run_state(RUN) == ("RUNNING", "m")
    assert cancellation.run_state(RUN) == ("RUNNING", "m")
    assert [(c.entered, c.exited) for c in clients.made] == [(True, True), (True, True)]
