"""Shared fixtures: paths to the real datasets, an isolated recloop home, fixed seeds."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recloop.settings import configure_environment, get_settings

configure_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The real datasets: ``RECLOOP_TEST_DATA`` when set (a clone outside the workspace), else ``../shared/data``.
#: Tests that need a dataset that is not there are skipped with the path they looked at.
SHARED_DATA = Path(os.environ.get("RECLOOP_TEST_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").exists():
        pytest.skip(f"ml-100k not found at {path}")
    return path


@pytest.fixture(scope="session")
def ml_latest_small_path() -> Path:
    path = SHARED_DATA / "ml-latest-small"
    if not (path / "ratings.csv").exists():
        pytest.skip(f"ml-latest-small not found at {path}")
    return path


@pytest.fixture()
def recloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated RECLOOP_HOME for one test; settings are re-read."""
    home = tmp_path / "home"
    monkeypatch.setenv("RECLOOP_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)


@dataclass
class LogDb:
    """An event-log database for one test: its URL, a unique events-table name, an engine."""

    url: str
    events_table: str
    engine: object


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogDb]:
    """SQLite in the test's folder, or the PostgreSQL at ``settings.postgres_url`` (skipped when absent), with a
    unique events-table name; every table of that schema (and its version table) is dropped afterwards."""
    from sqlalchemy import create_engine, inspect

    from recloop import logdb

    table = f"events_test_{uuid.uuid4().hex[:10]}"
    url = f"sqlite:///{tmp_path / 'eventlog.db'}" if request.param == "sqlite" else get_settings().postgres_url
    engine = create_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001 - any connection failure means the server is absent
        engine.dispose()
        if request.param == "postgres":
            pytest.skip(f"PostgreSQL not reachable: {err}")
        raise
    yield LogDb(url, table, engine)
    logdb.drop_all(engine, table)
    assert not {n for n in inspect(engine).get_table_names() if n.startswith(table)}
    engine.dispose()
