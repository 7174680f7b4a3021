"""Benchmarks: scripts that print one JSON document of figures (`recloop bench ... --json`)."""
