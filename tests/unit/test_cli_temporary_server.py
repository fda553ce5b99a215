"""Commands that run a flow with no PREFECT_API_URL (`hostmaint demo --simulated`, a dry run) wait long
enough for Prefect's temporary server, and say in one line when it does not come.

Prefect gives that server 20 s; its first start (a new database) on a busy machine took longer, and
`hostmaint demo --simulated`, the README's second command, died with a RuntimeError traceback.
"""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from hostmaint.errors import ServerError
from hostmaint_cli.runs import TEMPORARY_SERVER_WAIT_S, _run_flow

ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def _wait_seen(**kwargs: object) -> int:
    return int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


def test_a_run_waits_longer_for_the_temporary_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert TEMPORARY_SERVER_WAIT_S >= 120
    assert _run_flow(_wait_seen) == TEMPORARY_SERVER_WAIT_S


@pytest.mark.parametrize("chosen", [5, 300])
def test_the_operators_own_wait_is_kept(monkeypatch: pytest.MonkeyPatch, chosen: int) -> None:
    monkeypatch.setenv(ENV, str(chosen))
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: chosen}):
        assert _run_flow(_wait_seen) == chosen


def test_a_temporary_server_that_never_answers_is_one_line_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)

    def flow(**kwargs: object) -> None:
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server. stdout: ...")

    with pytest.raises(ServerError, match=r"did not answer within 120 s; nothing was started.*hostmaint server"):
        _run_flow(flow)
