"""The lab fixture: one real 3-host KVM lab per test module, torn down even on failure.

Lab tests need root and libvirtd; without either they are skipped with the reason. CI runs as
root after ``scripts/install-system.sh``, so there they run for real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostmaint.lab import LabInfo, lab_down, lab_up
from hostmaint.lab.network import BRIDGE, lab_links
from tests.lab.labkit import HOST_MEMORY_MIB, WORKDIR, lab_skip_reason, leftovers, wait_for_no_foreign_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[LabInfo]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    wait_for_no_foreign_lab()
    lab_down(WORKDIR)  # a fresh lab: a previous run's state would make the tests lie
    info = lab_up(hosts=3, vms=6, workdir=WORKDIR, linux_guests=1, host_memory_mib=HOST_MEMORY_MIB)
    try:
        yield info
    finally:
        lab_down(WORKDIR)
        left = leftovers(WORKDIR)
        assert not left, f"lab_down left behind: {left}"
        assert BRIDGE not in lab_links()
