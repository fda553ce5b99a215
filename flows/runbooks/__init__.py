"""Incident runbooks: an event about a host starts a run that plans, asks a human, then acts."""
