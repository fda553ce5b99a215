"""The SIMULATED fleet's speed is the inventory's ``simulation.time_scale``, where the docs say to set it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hostmaint.runtime import open_runtime
from hostmaint.simulated_fleet import demo_packages, demo_snapshot, write_simulated_fleet


def test_the_inventorys_time_scale_wins_over_the_state_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTMAINT_DB", str(tmp_path / "hostmaint.db"))
    snap = demo_snapshot(4, 12)
    inventory = write_simulated_fleet(tmp_path / "fleet", snap, demo_packages(snap), time_scale=0.05)
    data = yaml.safe_load(inventory.read_text())
    data["simulation"]["time_scale"] = 0.5  # an operator slows the demo down, as docs/deployments.md says
    inventory.write_text(yaml.safe_dump(data))

    rt = open_runtime(inventory, fresh=True)

    assert rt.simulated
    assert rt.hypervisor.time_scale == 0.5  # type: ignore[attr-defined]
