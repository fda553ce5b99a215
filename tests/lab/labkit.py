"""What the lab tests share: the workdir, the skip rule and the leftover check."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hostmaint.lab import LabInfo
from hostmaint.lab.lab import foreign_lab
from hostmaint.lab.network import LAB_NET, NETNS_PREFIX, lab_links, lab_netns

# one workdir per lab net, so test sessions on different HOSTMAINT_LAB_NETs can run side by side
WORKDIR = Path("/var/tmp/hostmaint-labtest" + (f"-net{LAB_NET}" if LAB_NET else ""))
# hv01 is the big host: a guest that fits there does not fit on hv02/hv03 (memory test)
HOST_MEMORY_MIB = (2048, 1024, 1024)


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, mounts, libvirtd)"
    if shutil.which("libvirtd") is None and not Path("/usr/sbin/libvirtd").exists():
        return "no libvirtd binary: run scripts/install-system.sh"
    return None


def leftovers(workdir: Path) -> list[str]:
    """Everything of a lab still on the machine: namespaces, links, mounts, live processes."""
    found = [f"netns {n}" for n in lab_netns()]
    found += [f"link {n}" for n in lab_links()]
    # the workdir as a whole path component: /var/tmp/hostmaint-labtest is a prefix of another net's
    # /var/tmp/hostmaint-labtest-net3, whose lab may be up beside this one
    inside = str(workdir).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f
                  if inside in line or f"/run/netns/{NETNS_PREFIX}" in line]
    marker = inside.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # exited while we looked
        if state != "Z" and marker in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"process {entry}: {words[:120]}")
    return found


def wait_for_no_foreign_lab(timeout: float = 900.0) -> None:
    """Only one lab fits on a machine (fixed names and addresses): wait for another user's to go."""
    deadline = time.monotonic() + timeout
    while (other := foreign_lab(WORKDIR)) is not None:
        assert time.monotonic() < deadline, f"another lab stays up on this machine: {other}"
        time.sleep(5)


@contextmanager
def hostmaint_db_at(path: Path) -> Iterator[None]:
    """$HOSTMAINT_DB set to ``path`` for a lab module (its tests follow each other on one lab, as runs
    would); afterwards the runtimes are closed and the variable is as it was."""
    from hostmaint.runtime import close_all

    saved = os.environ.get("HOSTMAINT_DB")
    os.environ["HOSTMAINT_DB"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HOSTMAINT_DB", None)
        else:
            os.environ["HOSTMAINT_DB"] = saved
        close_all()


@contextmanager
def fresh_lab(db: Path) -> Iterator[LabInfo]:
    """A new lab of 3 hosts (6 small guests and a Linux one, HOST_MEMORY_MIB) with hostmaint's
    concurrency limits and its own database at ``db``; torn down after, leaving nothing behind.
    Skips the module where the lab cannot run."""
    import pytest

    from flows.locks import ensure_limits
    from hostmaint.lab import lab_down, lab_up

    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    wait_for_no_foreign_lab()
    lab_down(WORKDIR)
    info = lab_up(hosts=3, vms=6, workdir=WORKDIR, linux_guests=1, host_memory_mib=HOST_MEMORY_MIB)
    ensure_limits(info.inventory_path)
    try:
        with hostmaint_db_at(db):
            yield info
    finally:
        lab_down(WORKDIR)
        assert not leftovers(WORKDIR), leftovers(WORKDIR)


def all_vms(rt: Any) -> dict[str, list[str]]:
    """vm -> hosts it runs on, asked of every lab host's libvirtd."""
    out: dict[str, list[str]] = {}
    for entry in rt.inventory.hosts:
        for vm in rt.hypervisor.running_vms(entry.name):
            out.setdefault(vm, []).append(entry.name)
    return out
