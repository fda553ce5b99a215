"""The operator's own steps around a host's maintenance: hooks at ``pre-drain``, ``pre-reboot``,
``post-verify`` and ``post-maintenance`` (a Ceph ``noout`` flag, a load balancer's drain, a CMDB update).

A hook is an argv list (never a shell string), run on the host over its ``HostShell`` (the SSH
driver quotes every element) or on the worker as a subprocess without a shell. ``$host`` and
``$cluster`` in an element are replaced by the names, element by element: a name never becomes
syntax. The cluster's hooks run before the host's own. Each run's exit code and output (redacted,
the end of it kept) go to the audit trail (step ``hook``).

A failing ``pre-drain``, ``pre-reboot`` or ``post-verify`` hook stops the host safely: it stays
cordoned with the reason naming the hook (its VMs run where they are), and the run ends with a
StepError. A failing ``post-maintenance`` hook (the host is back in service) is recorded and logged.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from hostmaint.display import visible
from hostmaint.errors import DriverError, StepError
from hostmaint.models import CommandResult, Step, StepOutcome
from hostmaint.monitoring import render_template
from hostmaint.redaction import redact, redact_text

if TYPE_CHECKING:
    from hostmaint.inventory import HookSpec
    from hostmaint.maintenance import RunContext
    from hostmaint.runtime import Runtime

log = logging.getLogger(__name__)

OUTPUT_KEPT = 4000  # characters of each stream kept in the audit record (the end: where errors are)


class HookPoint(StrEnum):
    PRE_DRAIN = "pre-drain"
    PRE_REBOOT = "pre-reboot"
    POST_VERIFY = "post-verify"
    POST_MAINTENANCE = "post-maintenance"

    @property
    def field(self) -> str:
        """The inventory field holding this point's hooks (``pre_drain``)."""
        return self.value.replace("-", "_")


STOPPING = frozenset({HookPoint.PRE_DRAIN, HookPoint.PRE_REBOOT, HookPoint.POST_VERIFY})


class HookPlace(StrEnum):
    HOST = "host"  # over the host's shell (SSH)
    WORKER = "worker"  # on the machine running the flow


LocalRunner = Callable[[Sequence[str], float, dict[str, str]], CommandResult]


def run_local(argv: Sequence[str], timeout: float, env: dict[str, str]) -> CommandResult:
    """Run ``argv`` on this machine without a shell; a timeout or a missing program is a failed result."""
    start = time.monotonic()
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout,
                              env={**os.environ, **env}, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return CommandResult(host="worker", argv=tuple(argv), exit_code=124, stderr=f"timed out after {timeout:g}s",
                             seconds=round(time.monotonic() - start, 3))
    except OSError as exc:
        return CommandResult(host="worker", argv=tuple(argv), exit_code=127, stderr=f"cannot run: {exc.strerror}",
                             seconds=round(time.monotonic() - start, 3))
    return CommandResult(host="worker", argv=tuple(argv), exit_code=done.returncode, stdout=done.stdout,
                         stderr=done.stderr, seconds=round(time.monotonic() - start, 3))


@dataclass(frozen=True)
class HookRun:
    """One hook as it ran."""

    name: str
    point: HookPoint
    place: HookPlace
    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    def why(self) -> str:
        if self.error is not None:
            return visible(self.error)  # a driver's error quotes the host (an SSH banner)
        last = (self.stderr.strip() or self.stdout.strip()).splitlines()[-1:] or [""]
        return f"exit {self.exit_code}" + (f": {visible(last[0][:200])}" if last[0] else "")


def _tail(text: str) -> str:
    # masked whole, then cut: a cut inside a URL's user part or a name=value left a password unrecognised
    return redact_text(text)[-OUTPUT_KEPT:]


def expand(spec: HookSpec, *, host: str, cluster: str) -> list[str]:
    """The hook's argv with ``$host``/``$cluster`` substituted element by element."""
    return [render_template(a, host=host, cluster=cluster) for a in spec.argv]


def run_hook(spec: HookSpec, point: HookPoint, rt: Runtime, run: RunContext, host: str, cluster: str, *,
             local: LocalRunner = run_local) -> HookRun:
    """Run one hook where its spec says; a host that cannot be reached is a failed hook, not a crash."""
    argv = expand(spec, host=host, cluster=cluster)
    start = time.monotonic()
    try:
        if spec.on is HookPlace.HOST:
            result = rt.shell.run(host, argv, timeout=spec.timeout_s)
        else:
            env = {"HOSTMAINT_HOST": host, "HOSTMAINT_CLUSTER": cluster, "HOSTMAINT_HOOK": point.value,
                   "HOSTMAINT_RUN_ID": run.run_id}
            result = local(argv, spec.timeout_s, env)
    except DriverError as exc:
        return HookRun(spec.name, point, spec.on, tuple(argv), None, "", "", round(time.monotonic() - start, 3),
                       error=str(exc))
    return HookRun(spec.name, point, spec.on, tuple(argv), result.exit_code, _tail(result.stdout),
                   _tail(result.stderr), result.seconds)


def run_hooks(rt: Runtime, run: RunContext, host: str, point: HookPoint, *,
              local: LocalRunner = run_local, keep_state: bool = False) -> list[HookRun]:
    """Run ``host``'s hooks at ``point`` in order, each with its audit record (step ``hook``).

    A failing hook at a stopping point keeps the host cordoned with the reason (VMs untouched) and
    raises StepError; the hooks after it do not run. ``keep_state``: the host stays in the state it
    is in, with the reason, instead (return-host's ``verifying`` host: its re-run verifies it again).
    A failing ``post-maintenance`` hook is recorded (outcome failed) and logged; the rest still run."""
    from hostmaint.maintenance import audited

    cluster = rt.cluster_of(host)
    done: list[HookRun] = []
    for spec in rt.inventory.hooks_for(host, point.field):
        with audited(rt, run, Step.HOOK, host=host,
                     inputs={"point": point.value, "hook": spec.name, "on": spec.on.value,
                             "argv": redact(expand(spec, host=host, cluster=cluster)),
                             "timeout_s": spec.timeout_s}) as rec:
            result = run_hook(spec, point, rt, run, host, cluster, local=local)
            done.append(result)
            rec.details.update({"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                                "seconds": result.seconds})
            if result.error is not None:
                rec.details["error"] = result.error
            if result.ok:
                continue
            reason = f"{point.value} hook {spec.name} failed ({result.why()})"
            if point in STOPPING:
                if keep_state:
                    stays = rt.states.note(host, f"stopped: {reason}", run.run_id).state.value
                else:
                    stays = rt.states.keep_out(host, f"stopped: {reason}", run.run_id).state.value
                raise StepError(f"{reason}; the host stays {stays}, its VMs run where they are", host, Step.HOOK)
            rec.outcome = StepOutcome.FAILED
            log.warning("%s: %s", host, reason)
    return done
