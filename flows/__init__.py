"""Orchestration layer: Prefect flows only (ingest, validate, features, train, evaluate, deploy, pipeline, loop)."""
