"""How many BentoML worker processes a service runs (issue 22: workers default to the cores)."""

from __future__ import annotations

import os

import pytest

from recloop.settings import Settings


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_the_embedded_default_runs_one_worker(tmp_path) -> None:
    assert Settings(home=tmp_path).effective_serve_workers == 1
    # PostgreSQL alone is not enough: the SQLite online store is still one file per host.
    assert Settings(home=tmp_path, profile="prod", online_store="sqlite").effective_serve_workers == 1


def test_the_production_stores_run_one_worker_per_usable_core(tmp_path) -> None:
    prod = Settings(home=tmp_path, profile="prod", online_store="redis")
    assert prod.event_log_uri.startswith("postgresql")
    assert prod.effective_serve_workers == min(64, _cores())
    # An SQLite event log keeps one worker even with Redis (its writers share one write lock).
    assert Settings(home=tmp_path, online_store="redis").effective_serve_workers == 1


@pytest.mark.parametrize("n", [1, 2, 7])
def test_an_explicit_count_wins(tmp_path, n: int) -> None:
    assert Settings(home=tmp_path, serve_workers=n).effective_serve_workers == n
    assert Settings(home=tmp_path, profile="prod", online_store="redis", serve_workers=n).effective_serve_workers == n


def test_a_bad_count_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError):
        Settings(home=tmp_path, serve_workers=0)
