"""Prefect tasks: thin, retrying wrappers, one per maintenance step, each one call into hostmaint."""
