"""Prefect's cancellation, translated into the core's :class:`~hostmaint.cancel.Cancellation`.

What Prefect 3.9 does on Cancel (the UI's button, ``prefect flow-run cancel``, or
``hostmaint run cancel``), read from its runner (prefect/runner/_cancellation_manager.py,
_process_manager.py) and measured (/work/shared/prefect-notes.md): the runner of a served flow, or
a process worker, sends SIGTERM to the flow run's process group, and SIGKILL 30 s later if it still
lives. In the flow's process Prefect's handler raises ``TerminationSignal`` in the main thread,
wherever it is; threads (a window's hosts, a drain's migrations) are not told at all.

So a hostmaint run registers a Cancellation per flow run (:func:`watching`) and sets it from two
sources: SIGTERM, while the main thread is inside :func:`graceful` (a drain, a window's loop: code
that can wind down within the grace period instead of being interrupted), and a poll of the run's
state (every :data:`POLL_S`), which is how a subflow run in a window's thread, cancelled on its own,
learns it (no process of its own gets a signal). Steps check it between them
(:func:`check`); the drain aborts its migrations on it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from hostmaint.cancel import Cancellation
from hostmaint.models import Step

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often a run asks the server whether it was cancelled
FROM_PREFECT = "the Prefect UI or API (Prefect does not record who)"
_PREFIX = "cancelled by "

_lock = threading.Lock()
_runs: dict[str, Cancellation] = {}


def for_run(run_id: str) -> Cancellation | None:
    """The Cancellation of flow run ``run_id`` in this process, if it registered one."""
    with _lock:
        return _runs.get(run_id)


def registered() -> bool:
    """Whether a run of this process registered its Cancellation (it is under way)."""
    with _lock:
        return bool(_runs)


def check(run_id: str, host: str | None = None, step: Step | None = None) -> None:
    """Raise RunCancelled before a step starts if the run was asked to stop."""
    cancel = for_run(run_id)
    if cancel is not None:
        cancel.check(host, step)


def cancel_all(by: str | None = None) -> None:
    """Set every registered Cancellation of this process (SIGTERM is for the whole process)."""
    with _lock:
        runs = list(_runs.values())
    for c in runs:
        c.cancel(by)


def who(message: str | None) -> str:
    """Who cancelled, from the state message: ``hostmaint run cancel`` writes "cancelled by X"."""
    text = (message or "").strip()
    if text.lower().startswith(_PREFIX) and len(text) > len(_PREFIX):
        return text[len(_PREFIX):][:200]
    return FROM_PREFECT


class HeldClient:
    """One Prefect client for a thread that asks the server again and again (a run's cancellation
    watch, every :data:`POLL_S`). A client made per ask builds its own HTTP client and TLS context:
    in the flow tests, a tenth of the test process's samples. Made on the first ask; ``drop`` closes it
    (after a failure the next ask makes a new one)."""

    def __init__(self) -> None:
        self._client: SyncPrefectClient | None = None

    def get(self) -> SyncPrefectClient:
        """The held client, made and opened on first use."""
        if self._client is None:
            from prefect.client.orchestration import get_client

            client = get_client(sync_client=True)
            client.__enter__()
            self._client = client
        return self._client

    def drop(self) -> None:
        """Close the held client, if any."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken connection: nothing to save
                client.__exit__(None, None, None)


def _asking(held: HeldClient | None) -> contextlib.AbstractContextManager[SyncPrefectClient]:
    if held is not None:
        return contextlib.nullcontext(held.get())
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def run_state(run_id: str, held: HeldClient | None = None) -> tuple[str | None, str | None]:
    """(state type, message) of flow run ``run_id`` as the server has it (asked with ``held``'s client,
    else with one made for this ask)."""
    with _asking(held) as client:
        state = client.read_flow_run(UUID(run_id)).state
    return (state.type.value if state else None, state.message if state else None)


def cancelled_on_server(run_id: str, held: HeldClient | None = None) -> str | None:
    """Who cancelled ``run_id`` if the server says it is cancelling or cancelled, else None."""
    kind, _ = run_state(run_id, held)
    return who_cancelled(run_id, held) if kind in ("CANCELLING", "CANCELLED") else None


def who_cancelled(run_id: str, held: HeldClient | None = None) -> str:
    """Who asked to cancel ``run_id``, from its state history: Prefect's runner and engine write their
    own Cancelling states after the one that asked, so the latest state's message is not it."""
    with _asking(held) as client:
        states = client.read_flow_run_states(UUID(run_id))
    named = [who(s.message) for s in states if s.type.value in ("CANCELLING", "CANCELLED")]
    return next((n for n in named if n != FROM_PREFECT), FROM_PREFECT)


def _name_the_cancellers(runs: list[tuple[str, Cancellation]]) -> None:
    named: dict[str, str] = {}
    try:
        named = cancellation_names([run_id for run_id, _ in runs])
    finally:
        # SIGTERM is for the whole process: the run that was cancelled names who, for every run in it
        by = next((n for n in named.values() if n != FROM_PREFECT), None)
        for run_id, cancel in runs:
            cancel.named(named.get(run_id) if named.get(run_id, FROM_PREFECT) != FROM_PREFECT else by)


def cancellation_names(run_ids: list[str]) -> dict[str, str]:
    """Who cancelled each of ``run_ids`` (those the server could be asked about)."""
    named = {}
    for run_id in run_ids:
        try:
            named[run_id] = who_cancelled(run_id)
        except Exception as exc:  # noqa: BLE001 - the stand-down asks again
            log.debug("cannot read who cancelled run %s: %s", run_id, exc)
    return named


@contextmanager
def watching(run_id: str, also: tuple[str, ...] = ()) -> Iterator[Cancellation]:
    """Register ``run_id``'s Cancellation for the block and poll the server for it (and for the runs in
    ``also``: a subflow stops when its window is cancelled)."""
    cancel = Cancellation()
    with _lock:
        _runs[run_id] = cancel
    done = threading.Event()

    def poll() -> None:
        held = HeldClient()
        try:
            while not done.wait(POLL_S) and not cancel.is_set():
                for rid in (run_id, *also):
                    try:
                        by = cancelled_on_server(rid, held)
                    except Exception as exc:  # noqa: BLE001 - a server that does not answer is asked again
                        log.debug("cannot read the state of run %s: %s", rid, exc)
                        held.drop()
                        continue
                    if by is not None:
                        cancel.cancel(by)
                        break
        finally:
            held.drop()

    watcher = threading.Thread(target=poll, name=f"cancel-watch-{run_id[:8]}", daemon=True)
    watcher.start()
    try:
        yield cancel
    finally:
        done.set()
        with _lock:
            _runs.pop(run_id, None)


@contextmanager
def graceful() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM sets every registered Cancellation instead of
    raising Prefect's TerminationSignal at once, so the block winds down (aborts its migrations, waits
    for them to settle) inside the runner's 30 s. Elsewhere it changes nothing (only the main thread
    gets signals; a thread's work learns it from the Cancellation)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: Any = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: FrameType | None) -> None:
        with _lock:
            runs = list(_runs.items())
        for _, cancel in runs:
            cancel.naming()  # before they stop: a record written while the lookup runs waits for its name
        cancel_all()
        # who asked is on the server; the drain winds down meanwhile, and its record waits for the name
        threading.Thread(target=_name_the_cancellers, args=(runs,), name="cancel-who", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
