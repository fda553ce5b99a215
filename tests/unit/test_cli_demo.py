"""`hostmaint demo`: options for the lab are refused with --simulated rather than ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostmaint_cli.main import app


@pytest.mark.parametrize("extra", [["--hosts", "8"], ["--vms", "20"], ["--keep"]])
def test_lab_options_are_refused_with_simulated(extra: list[str], tmp_path: Path) -> None:
    # 'demo --simulated --hosts 8' ran the 4-host demo as if asked for it
    work = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--simulated", "--workdir", str(work), *extra])
    assert result.exit_code == 2 and "for the lab only" in result.output, result.output
    assert not work.exists()  # refused before anything was written
