"""Prefect deployments of the hostmaint flows: what runs when, on which trigger, and the server they need.

- ``deployments.serve``  builds the deployments (schedules, triggers, forms) and serves them from one process;
- ``deployments.server`` starts a local Prefect server and sets it up (work pool, limits, automation, deployments);
- ``deployments.cli``    the ``hostmaint setup | server | serve | event`` commands;
- ``prefect.yaml``       the same deployments for a process work pool (``prefect deploy --all``).
"""
