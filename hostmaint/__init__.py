"""hostmaint: maintenance orchestration for KVM/libvirt fleets (the core; no Prefect here)."""

__version__ = "0.1.0"
