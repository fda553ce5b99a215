"""The lab fixture: one real 3-host KVM lab for the whole session, torn down even on failure.

Lab tests need root and libvirtd; without either they are skipped with the reason. CI runs as
root after ``scripts/install-system.sh``, so there they run for real.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmaint.lab import LabInfo, lab_down, lab_up
from hostmaint.lab.lab import foreign_lab
from hostmaint.lab.network import BRIDGE, lab_links, lab_netns

WORKDIR = Path("/var/tmp/hostmaint-labtest")
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
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f
                  if str(workdir) in line or "/run/netns/hmlab" in line]
    marker = str(workdir).encode()
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


@pytest.fixture(scope="session")
def lab() -> Iterator[LabInfo]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    # Only one lab fits on a machine (fixed names and addresses): wait for another user's to go.
    deadline = time.monotonic() + 900
    while (other := foreign_lab(WORKDIR)) is not None:
        assert time.monotonic() < deadline, f"another lab stays up on this machine: {other}"
        time.sleep(5)
    lab_down(WORKDIR)  # a fresh lab: a previous run's state would make the tests lie
    info = lab_up(hosts=3, vms=6, workdir=WORKDIR, linux_guests=1, host_memory_mib=HOST_MEMORY_MIB)
    try:
        yield info
    finally:
        lab_down(WORKDIR)
        left = leftovers(WORKDIR)
        assert not left, f"lab_down left behind: {left}"
        assert BRIDGE not in lab_links()
