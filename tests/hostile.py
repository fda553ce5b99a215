"""Names a tenant could give a VM (libvirt accepts them all), for tests of every output path.

Each one tries to change what an operator sees: rich markup (styles, a closing tag with nothing
to close, a hyperlink), emoji codes, line breaks that would split a table row, ANSI escapes, a
right-to-left override, markdown table and HTML syntax, spreadsheet formulas.
"""

from __future__ import annotations

from hostmaint.fleet import dump_snapshot
from hostmaint.models import FleetSnapshot
from hostmaint.simulated_fleet import demo_snapshot

HOSTILE_NAMES: dict[str, str] = {
    "markup": "[bold red]x",
    "closing-tag": "a[/]b",
    "link": "[link=https://evil.example]y[/link]",
    "emoji": ":warning:",
    "newline": "line1\nline2",
    "carriage-return": "cr\rx",
    "tab": "tab\tx",
    "ansi": "esc\x1b[31mred",
    "bidi-override": "bidi\u202eevil",
    "zero-width": "zero\u200bwidth",
    "markdown": "pipe|`tick`*em*<script>alert(1)</script>",
    "formula": "=HYPERLINK(\"https://evil.example\")",
    "backslash": "back\\slash",
}

# the same names once they reach a host's place: hosts come from the inventory, whose names are
# restricted, but a snapshot file can name them anything
HOSTILE_HOSTS = {"hv01": "hv01", "hv02": "[/]hv02", "hv03": "hv\n03", "hv04": "hv04\u202e"}
HOSTILE_CLUSTER = "[red]demo|x"


def hostile_snapshot(*, hosts: bool = False) -> FleetSnapshot:
    """The demo cluster (4 hosts) with one VM per hostile name; with ``hosts``, hostile host and cluster names.

    The first host is fuller than the others (its cells' free memory says so), so a rebalance moves VMs."""
    snap = demo_snapshot(4, len(HOSTILE_NAMES))
    rename = HOSTILE_HOSTS if hosts else {h.name: h.name for h in snap.hosts}
    cluster = HOSTILE_CLUSTER if hosts else snap.cluster
    vms = tuple(v.model_copy(update={"name": name, "host": rename[v.host], "anti_affinity": None})
                for v, name in zip(snap.vms, HOSTILE_NAMES.values(), strict=True))
    host_models = tuple(h.model_copy(update={"name": rename[h.name], "cluster": cluster}) for h in snap.hosts)
    crowded = tuple(c.model_copy(update={"free_mib": 8192}) for c in host_models[0].cells)
    host_models = (host_models[0].model_copy(update={"cells": crowded}), *host_models[1:])
    # through JSON, as a snapshot file would arrive
    from hostmaint.fleet import parse_snapshot

    return parse_snapshot(dump_snapshot(snap.model_copy(update={"vms": vms, "hosts": host_models,
                                                                 "cluster": cluster})))
