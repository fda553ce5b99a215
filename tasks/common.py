"""What every task shares: the runtime reference, retry rules, logging of drain events and of the core."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.states import State

from hostmaint.errors import InputError, TransientDriverError
from hostmaint.migration import DrainEvent
from hostmaint.migration.narrate import describe
from hostmaint.placement.exact import DEFAULT_BUDGET
from hostmaint.runtime import Runtime, open_runtime


class CoreLogForwarder(APILogHandler):
    """Sends the core library's log records (``hostmaint.*``: a reboot's progress, a blocked abort) to
    the Prefect run they happen in, so the operator reads them in the run's log in the UI.

    What Prefect's ``PREFECT_LOGGING_EXTRA_LOGGERS`` does, without relying on every worker's
    environment; records outside any run (the CLI, a bare thread) are left to the other handlers
    instead of raising Prefect's "no flow run" warning.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


def forward_core_logs() -> None:
    """Attach :class:`CoreLogForwarder` to the ``hostmaint`` logger once; INFO unless a level was set."""
    core = logging.getLogger("hostmaint")
    if not any(isinstance(h, CoreLogForwarder) for h in core.handlers):
        core.addHandler(CoreLogForwarder())
    if core.level == logging.NOTSET:
        core.setLevel(logging.INFO)


forward_core_logs()  # every task module imports this one, in whatever process runs the flow


class SecretBlockMissing(InputError):
    """The inventory names a Secret block (``key: {secret_block: NAME}``) that Prefect does not have."""


class SecretBlockUnusable(InputError):
    """The Secret block exists but cannot be read, or does not hold a key as text."""


def load_secret_block(name: str) -> str:
    """The SSH private key held by the Prefect Secret block ``name``: the ``key_loader`` for ``secret_block``.

    Errors name the block and never carry what it holds, nor Prefect's own messages, which
    may quote block data (a schema mismatch is a pydantic error showing its input). The SSH
    driver keeps only the error's type, so the types say what happened.
    """
    from prefect.exceptions import ObjectNotFound

    from tasks.prefect_private import load_secret

    failure: type[InputError] | None = None
    detail = ""
    try:
        block = load_secret(name)
    except ValueError as exc:
        if isinstance(exc.__cause__, ObjectNotFound):
            failure, detail = SecretBlockMissing, (f"there is no Prefect Secret block {name!r}: create it with the "
                                                   "private key as its value (UI: Blocks, or "
                                                   f"Secret(value=...).save({name!r}))")
        else:
            failure, detail = SecretBlockUnusable, f"Prefect Secret block {name!r} cannot be read: {type(exc).__name__}"
    # raised outside the except block, so no __context__ carries Prefect's message along
    if failure is not None:
        raise failure(detail)
    value = block.get()
    if not isinstance(value, str) or not value.strip():
        raise SecretBlockUnusable(f"Prefect Secret block {name!r} does not hold a private key as text "
                                  f"(it holds {type(value).__name__ if value else 'nothing'})")
    return value


@dataclass(frozen=True)
class RuntimeRef:
    """Names a runtime instead of carrying it: tasks rebuild or reuse it in their own process."""

    inventory: str
    db_url: str | None = None
    # deterministic seconds for the planner's exact stage in every plan these tasks make (0: greedy only)
    exact_budget: float = DEFAULT_BUDGET

    def open(self) -> Runtime:
        # hosts whose key is in a Secret block (key: {secret_block: NAME}) get it through Prefect
        return open_runtime(self.inventory, self.db_url, key_loader=load_secret_block)


def transient_only(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry a task only when it failed because a host could not be reached.

    A command that ran and failed, a bad plan or a broken invariant is not retried:
    doing it again blindly could make things worse.
    """
    try:
        state.result()
    except TransientDriverError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


IO_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_condition_fn": transient_only}


def drain_logger(total: int = 0) -> Callable[[DrainEvent], None]:
    """Narrate a drain in the run's log and keep a progress artifact (VMs done / total, bytes moved).

    The audit trail keeps the record; these are views of it. The logger is taken
    here, in the task, because drain events arrive on the drain's worker threads,
    which have no Prefect run context of their own.
    """
    logger = get_run_logger()
    # called from sync tasks only, where Prefect's sync-compatible helper returns the id itself
    artifact = cast(UUID, create_progress_artifact(0.0, description=f"drain: 0 of {total} VM(s) done")
                    ) if total else None
    mirror = _root_progress(f"drain: 0 of {total} VM(s) done") if total else None
    done = 0
    moved = 0
    lock = threading.Lock()

    def log(event: DrainEvent) -> None:
        nonlocal done, moved
        kind = getattr(event.kind, "value", event.kind)
        # a sentence, not a dict; the VM name is the host's: one log line, whatever it holds
        logger.info("%s", describe(event))
        if kind == "progress":
            return
        if artifact is None or kind not in ("finished", "failed", "aborted", "skipped"):
            return
        with lock:
            done += 1
            moved += int(event.detail.get("data_bytes") or 0)
            progress = min(100.0, 100.0 * done / total)
            text = f"drain: {done} of {total} VM(s) done, {moved / 2**30:.2f} GiB moved"
        update_progress_artifact(artifact, progress, description=text)
        if mirror is not None:
            update_progress_artifact(mirror, progress, description=text)

    return log


def root_run_id() -> str | None:
    """The id of the flow run at the top of this one's tree (this run's own when it is no subflow), or
    None outside a flow run. Asked of the server once per run: Prefect's ``root_flow_run_id`` reads the
    parent's task run and flow run, each with a client made for it, on every ask."""
    from prefect import runtime

    run_id = runtime.flow_run.id
    return _root_of(str(run_id)) if run_id else None


@functools.lru_cache(maxsize=1024)  # a run's place in its tree never changes; a worker runs many
def _root_of(run_id: str) -> str:
    from prefect import runtime

    return str(runtime.flow_run.root_flow_run_id or run_id)


def _root_progress(description: str) -> UUID | None:
    """A progress artifact on the run at the top of this one's tree, when the drain runs in a subflow:
    the UI sends whoever submitted a form (or opened a runbook) to that run, not to the subflow."""
    from prefect import runtime
    from prefect.artifacts import ProgressArtifact

    root, here = root_run_id(), runtime.flow_run.id
    if not root or str(root) == str(here):
        return None
    created = ProgressArtifact(progress=0.0, description=description, flow_run_id=UUID(str(root))).create()
    return cast(UUID, getattr(created, "id", created))
