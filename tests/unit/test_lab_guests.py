"""The lab's Linux guests: what their domain XML tells the init script, and what the script reads of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostmaint.lab.guests import _INIT, GuestSpec, linux_xml


def _cmdline(xml: str) -> str:
    return xml.split("<cmdline>")[1].split("</cmdline>")[0]


def test_a_paced_guest_carries_its_pace_and_an_unpaced_one_none() -> None:
    paced = linux_xml(GuestSpec("dt1", "hv01", 256, linux=True, dirty_mib=128, dirty_mib_s=4), Path("k"), Path("i"))
    assert "dirty_mib=128 dirty_mib_s=4" in _cmdline(paced)
    plain = linux_xml(GuestSpec("dt2", "hv01", 256, linux=True, dirty_mib=128), Path("k"), Path("i"))
    assert "dirty_mib_s" not in _cmdline(plain)
    with pytest.raises(ValueError, match="dt3: dirty_mib_s"):
        linux_xml(GuestSpec("dt3", "hv01", 256, linux=True, dirty_mib=128, dirty_mib_s=-1), Path("k"), Path("i"))


@pytest.mark.parametrize(("cmdline", "mib", "pace"), [
    ("console=ttyS0 quiet dirty_mib=128 dirty_mib_s=4", "128", "4"),
    ("console=ttyS0 quiet dirty_mib=64", "64", ""),
])
def test_the_init_script_reads_the_region_and_the_pace_apart(tmp_path: Path, cmdline: str, mib: str,
                                                             pace: str) -> None:
    # the two settings share a prefix: the region must not be read from the pace, nor the other way round
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    lines = [ln.replace("/proc/cmdline", str(tmp_path / "cmdline")) for ln in _INIT.splitlines()
             if ln.startswith(("mib=", "pace="))]
    out = subprocess.run(["sh", "-c", "\n".join(lines) + '\necho "$mib|$pace"'], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == f"{mib}|{pace}"
