"""The hostmaint exception tree.

Vendor errors (libvirt, paramiko, SQLAlchemy, YAML) are translated once, in the
driver or loader that meets them, into one of these, with ``raise ... from exc``::

    HostmaintError
    ├── InputError                  bad inventory, parameters or snapshot: exit 2, nothing changed
    │   ├── InventoryError          names the file, the field path and the host
    │   ├── SnapshotError           a fleet snapshot that does not parse or is inconsistent
    │   └── FileFormatError         a file that is not UTF-8, does not parse, or repeats a key
    ├── PlanError                   no safe plan (an unplaceable VM, N+1 refused)
    ├── StateError                  an invalid host state transition
    ├── LockError                   a host or cluster lock is missing (never run unlocked)
    │   └── LockHeldError           the lock is held by another run: wait or come back later
    ├── DriverError                 I/O towards a host failed
    │   ├── TransientDriverError    worth retrying (connection refused, dropped, timed out)
    │   ├── HostKeyError            an unknown or changed SSH host key: never retried
    │   ├── CommandError            a command ran and failed: never retried blindly
    │   └── MigrationError          a live migration failed or was aborted; the VM stays on its source
    ├── MonitoringError             Prometheus or Alertmanager did not answer, or refused (names the url)
    ├── StepError                   a maintenance step failed; the host is left cordoned/failed
    │   └── TargetsUnreachable      a drain's targets stopped answering: what did not move can be re-planned
    ├── AuditError                  the audit chain does not verify
    └── ServerError                 the orchestration server (Prefect's API) did not answer
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hostmaint.models import Step
from hostmaint.redaction import redact_text

if TYPE_CHECKING:
    from hostmaint.migration.drain import DrainReport


class HostmaintError(Exception):
    """Base of every error hostmaint raises on purpose.

    Its message is masked when the error is made (:func:`hostmaint.redaction.redact_text`): errors
    quote host output, such as dnf's with a repository URL and its password, and from here the text
    reaches host states, run results, logs and the Prefect UI.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class InputError(HostmaintError):
    """Bad input: the operation changed nothing. The CLI exits 2."""


class InventoryError(InputError):
    """An inventory that does not validate; the message names file, field path and host."""

    def __init__(self, problems: list[str], source: str = "<inventory>") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems) if len(problems) == 1 else
                         f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))


class SnapshotError(InputError):
    """A fleet snapshot that does not parse or contradicts itself."""


class FileFormatError(InputError):
    """A file that cannot be read, is not UTF-8, does not parse, or gives a key twice
    (hostmaint.config_file). ``source`` is the file, ``problem`` what is wrong and where."""

    def __init__(self, problem: str, source: str) -> None:
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: {problem}")


class PlanError(HostmaintError):
    """No safe plan exists; nothing was moved."""


class StateError(HostmaintError):
    """A host state transition that the state machine does not allow."""


class LockError(HostmaintError):
    """A lock that is held by another run, or a limit that does not exist."""


class LockHeldError(LockError):
    """Another run holds the lock: nothing is wrong with the host, it is busy."""


class DriverError(HostmaintError):
    """I/O towards a host failed. ``host`` names it."""

    def __init__(self, message: str, host: str | None = None) -> None:
        self.host = host
        super().__init__(f"{host}: {message}" if host else message)


class TransientDriverError(DriverError):
    """A failure worth retrying: the connection, not the operation, failed."""


class HostKeyError(DriverError):
    """An unknown or changed SSH host key. Refused, never retried, never accepted silently."""


class CommandError(DriverError):
    """A command ran on the host and failed."""

    def __init__(self, message: str, host: str | None = None, exit_code: int | None = None,
                 stderr: str = "") -> None:
        self.exit_code = exit_code
        self.stderr = stderr
        super().__init__(message, host)


class MigrationError(DriverError):
    """A live migration failed or was aborted. ``vm`` and ``target`` name it; the VM stays on its source."""

    def __init__(self, message: str, host: str | None = None, vm: str | None = None,
                 target: str | None = None) -> None:
        self.vm = vm
        self.target = target
        super().__init__(message, host)


class MigrationNotStarted(MigrationError):
    """A live migration that failed before it was asked of libvirt (the source or the target could
    not be reached, the VM's XML could not be read): the VM did not move, wherever it runs."""


class MonitoringError(HostmaintError):
    """Prometheus or Alertmanager could not be reached or refused a request; ``url`` names it (redacted)."""

    def __init__(self, message: str, url: str) -> None:
        self.url = redact_text(url)
        super().__init__(f"{self.url}: {message}")


def names_host(message: str, host: str) -> bool:
    """Whether ``message`` already says which host it is about: it starts ``"{host}: "`` (the form every
    error of this tree takes) or ``"host {host} "`` (``host hv01 is failed (...)``).

    Only the start counts: a message that mentions ``host`` further on, or a longer name that starts
    with it (``hv10`` for ``hv1``, a VM named like its host), does not say which host failed.
    """
    return message.startswith((f"{host}: ", f"host {host} "))


def without_host(exc: BaseException, host: str) -> str:
    """What ``exc`` says without its leading ``"{host}: "``: for quoting an error of ``host`` in a message
    about that same host, which names the host once, at its start."""
    return str(exc).removeprefix(f"{host}: ")


class StepError(HostmaintError):
    """A maintenance step failed; the host was left cordoned or failed with this reason.

    Every failure names its host: the message gets a ``"{host}: "`` prefix unless it already names
    it (:func:`names_host`).
    """

    def __init__(self, message: str, host: str | None = None, step: str | None = None) -> None:
        self.host = host
        self.step = step
        super().__init__(message if host is None or names_host(message, host) else f"{host}: {message}")


class TargetsUnreachable(StepError):
    """A drain failed because some of its targets stopped answering (``hosts``); ``report`` says what
    moved. What did not move may still go elsewhere: the caller can re-plan without those hosts."""

    def __init__(self, message: str, host: str | None, hosts: list[str], report: DrainReport) -> None:
        self.hosts = hosts
        self.report = report
        super().__init__(message, host, Step.DRAIN)

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect keeps a task's exception: it must survive pickling
        return (type(self), (self.args[0], self.host, self.hosts, self.report))


class TargetsWithdrawn(TargetsUnreachable):
    """A drain stopped sending to targets that left service while it ran (``hosts``: an operator cordoned
    one, another run took it into maintenance); ``report`` says what moved. They answer: what did not
    move is re-planned on a fresh discovery, where they are out of service, not left out."""


class AuditError(HostmaintError):
    """The audit chain does not verify; the message names the first bad record."""


class ServerError(HostmaintError):
    """The orchestration server (Prefect's API) did not answer, so a run could not start or report."""
