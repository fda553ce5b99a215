"""The ``hostmaint`` command line, assembled from the layers that own its commands.

Where a command goes:

- uses only the core (plans, inventory, snapshots, host state, audit, lab, what-if):
  ``hostmaint/cli.py``. It stays importable and runnable without Prefect.
- starts a flow or talks to Prefect's runs (evacuate, patch, window run, run cancel, demo):
  ``hostmaint_cli/runs.py``.
- sets up or runs the Prefect server and deployments, or sends events (setup, server, serve,
  event): ``deployments/cli.py``.

A group may be filled by several layers (``host status`` is the core's, ``host return`` starts a
flow): each layer declares its own ``typer.Typer`` of that name and :func:`hostmaint_cli.main.assemble`
merges them. ``hostmaint_cli.main.app`` is the program (the ``hostmaint`` console script).
"""
