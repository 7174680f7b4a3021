"""Shared fixtures: paths to the real datasets, an isolated recloop home, fixed seeds."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from recloop.settings import configure_environment, get_settings

configure_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
