"""Pseudonymous user ids end to end (issue 21): ml-100k ingested with the setting on, then the API and forget.

The ingestion door (``recloop.sources.read_source`` → validation → quarantine → lake) and the API door
(``serving/service.py``'s endpoints, called in-process on the service class) both map a raw id to the same
keyed hash; nothing stored holds a raw id; forgetting and experiment assignment use the stored id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recloop.experiments import assign_arm
from recloop.pseudonym import Pseudonymizer

pytestmark = pytest.mark.slow  # ~25 s: validating all of ml-100k
KEY = "a-test-pseudonym-key-0123456789"


@pytest.fixture()
def pseudonymous_home(recloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from recloop.settings import get_settings

    monkeypatch.setenv("RECLOOP_PSEUDONYMIZE_USER_IDS", "true")
    monkeypatch.setenv("RECLOOP_PSEUDONYM_KEY", KEY)
    get_settings.cache_clear()
    yield recloop_home
    get_settings.cache_clear()


def _ingest(path: Path) -> Any:
    from flows.ingest import accepted_frames
    from flows.validate import read_and_validate, write_outcome
    from recloop.lake import Lake
    from recloop.settings import get_settings

    settings = get_settings()
    outcome = write_outcome(read_and_validate("movielens-100k", str(path), datetime.now(UTC)), settings.home)
    return Lake(settings.lake_path).ingest(accepted_frames(outcome, "movielens-100k")), outcome


def test_ingestion_stores_pseudonyms_only_and_reingesting_is_idempotent(pseudonymous_home: Path,
                                                                         ml100k_path: Path) -> None:
    from recloop.lake import Lake
    from recloop.settings import get_settings

    p = Pseudonymizer(KEY.encode())
    raw_users = set(pd.read_csv(ml100k_path / "u.data", sep="\t", header=None, usecols=[0])[0].astype(str))
    report, outcome = _ingest(ml100k_path)
    lake = Lake(get_settings().lake_path)
    stored = set(lake.events()["user_id"].astype(str))
    assert report.new_events == 100_000 and len(stored) == len(raw_users) == 943
    assert stored == {p(u) for u in raw_users} and not stored & raw_users
    assert set(lake.users()["user_id"].astype(str)) <= stored  # the users table is mapped too
    # No raw id in any Parquet file of the lake (every user_id column of every table).
    for file in Path(get_settings().lake_path).rglob("*.parquet"):
        frame = pd.read_parquet(file)
        if "user_id" in frame.columns:
            assert not set(frame["user_id"].astype(str)) & raw_users, file
    again, _ = _ingest(ml100k_path)  # the same raw file: the same pseudonyms and event ids, nothing new
    assert again.new_events == 0 and len(lake.events()) == 100_000


class _Core:
    """The serving core as the endpoints call it: records the user id each call receives."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def recommend(self, user_id: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.ids.append(user_id)
        return {"items": [], "model_version": "1", "variant": "champion", "strategy": "popularity",
                "cold_start": True, "request_id": "0" * 32}

    def feedback(self, user_id: str, item_id: str, event_type: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.ids.append(user_id)
        return {"event_id": "e1", "inserted": True, "known_item": True, "recent_items": 1, "degraded": False,
                "role": "positive"}


def test_the_api_maps_the_same_raw_id_to_the_stored_pseudonym(pseudonymous_home: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.forget
    import serving.service as service
    from recloop.pseudonym import identity_or
    from recloop.settings import get_settings

    endpoint = object.__new__(service.Recommender.inner)  # the endpoints without starting a runtime
    endpoint.settings = get_settings()
    endpoint.core = _Core()
    endpoint.pseudonym = identity_or(endpoint.settings)
    endpoint.recommend(user_id="196", k=5)
    endpoint.feedback(user_id="196", item_id="242", event_type="click")
    forgotten: list[str] = []
    receipt = {"user_hash": "h", "status": "done", "rows": {}, "seconds": {}, "new_request": True}
    monkeypatch.setattr(serving.forget, "forget_user", lambda user_id, *a, **k: forgotten.append(user_id) or receipt)
    endpoint.runtime = type("Runtime", (), {"client": None})()
    assert endpoint.forget(user_id="196").status == "done"
    p = Pseudonymizer(KEY.encode())
    assert endpoint.core.ids == [p("196"), p("196")] and p("196") != "196"
    assert forgotten == [p("196")]  # forgetting works on the stored id
    # Experiment assignment hashes the stored id: every worker agrees without the key.
    assert assign_arm("salt", p("196")) == assign_arm("salt", endpoint.core.ids[0])


def test_pseudonyms_on_without_a_key_refuse_to_start(recloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recloop.settings import get_settings
    from recloop.sources import read_source

    monkeypatch.setenv("RECLOOP_PSEUDONYMIZE_USER_IDS", "true")
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="RECLOOP_PSEUDONYM_KEY"):
            read_source("synthetic", None, n_users=5, n_items=20, n_events=50)
    finally:
        get_settings.cache_clear()
