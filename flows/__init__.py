"""Prefect flows: the runbooks. Deployments name these entrypoints."""
