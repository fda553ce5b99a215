"""The local KVM lab: real libvirtd/QEMU/sshd "hosts" in network namespaces on this machine."""

from hostmaint.lab.lab import (
    DEFAULT_WORKDIR,
    LabHost,
    LabInfo,
    LabStatus,
    LabVm,
    add_guest,
    kill_libvirtd,
    lab_down,
    lab_status,
    lab_up,
    reboot_host,
    remove_guest,
    start_libvirtd,
)
from hostmaint.lab.network import LabError

__all__ = ["DEFAULT_WORKDIR", "LabError", "LabHost", "LabInfo", "LabStatus", "LabVm", "add_guest", "kill_libvirtd",
           "lab_down", "lab_status", "lab_up", "reboot_host", "remove_guest",
           "start_libvirtd"]
