"""Lab nets: each HOSTMAINT_LAB_NET has names and a subnet no other net uses (so two labs can be up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = ("import json; from hostmaint.lab import network as n; print(json.dumps([str(n.LAB_SUBNET), n.BRIDGE, "
         "n.NETNS_PREFIX, n.VETH_PREFIX, n.host_ip(1), n.veth_name('hv01')]))")


def _names(net: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "HOSTMAINT_LAB_NET"}
    if net is not None:
        env["HOSTMAINT_LAB_NET"] = net
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_net_zero_keeps_the_historical_names() -> None:
    assert _names(None) == ["10.213.7.0/24", "hmlab0", "hmlab-", "hml-", "10.213.7.11", "hml-hv01"]
    assert _names("0") == _names(None)


def test_every_net_has_names_and_addresses_of_its_own() -> None:
    nets = [_names(str(i)) for i in (0, 1, 9)]
    for field in range(len(nets[0])):
        assert len({n[field] for n in nets}) == 3, field
    # teardown selects by prefix: one net's prefix must not select another net's namespaces or links
    for i, mine in enumerate(nets):
        for j, other in enumerate(nets):
            if i != j:
                assert not (other[2] + "hv01").startswith(mine[2])
                assert not other[5].startswith(mine[3])


@pytest.mark.parametrize("bad", ["10", "-1", "x", "1.5"])
def test_a_bad_net_is_refused_naming_the_variable(bad: str) -> None:
    env = {**os.environ, "HOSTMAINT_LAB_NET": bad}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "HOSTMAINT_LAB_NET" in out.stderr
