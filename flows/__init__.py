"""Orchestration layer: Prefect flows, deployments and the ``recloop`` CLI."""
