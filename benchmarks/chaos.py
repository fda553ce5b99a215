"""The fault campaign on the real lab (hostmaint/lab/chaos.py), as a script: the same as
``hostmaint lab chaos``. Runs as root with ``HOSTMAINT_LAB_NET`` naming the lab's net.

    sudo HOSTMAINT_LAB_NET=1 .venv/bin/python benchmarks/chaos.py --seed 1 --minutes 9
    sudo HOSTMAINT_LAB_NET=1 .venv/bin/python benchmarks/chaos.py --replay 1234567
    .venv/bin/python benchmarks/chaos.py --report --out DIR
"""

from __future__ import annotations

import sys

from deployments.chaos import LocalPrefect
from hostmaint.lab.chaos import main

if __name__ == "__main__":
    sys.exit(main(prefect=LocalPrefect))
