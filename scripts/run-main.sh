#!/usr/bin/env bash
# The main job: set up, bring up the local KVM lab (3 hosts, real libvirtd/sshd/QEMU in network
# namespaces) and run a real rolling patch window through Prefect; then tear the lab down.
# Without root it falls back to the SIMULATED fleet and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
if [ "$(id -u)" -eq 0 ]; then
    exec .venv/bin/hostmaint demo "$@"
else
    echo "not root: running the SIMULATED fleet instead of the lab" >&2
    exec .venv/bin/hostmaint demo --simulated "$@"
fi
