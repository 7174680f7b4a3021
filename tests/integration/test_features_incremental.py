"""The incremental features stage on a real Feast store (SQLite online, file offline): new lake batches only."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from featurestore.incremental import full_state, read_state, update_features, write_state
from featurestore.materialize import SOURCE_FILES, read_watermark, refresh_features
from featurestore.online import OnlineFeatures, open_feature_store
from recloop.contract import coerce_events
from recloop.lake import Lake
from recloop.settings import Settings
from recloop.sources.base import SourceFrames

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _events(users: range, start: datetime, n_per_user: int, tag: str) -> pd.DataFrame:
    rows = [{"event_id": f"{tag}-{u}-{k}", "user_id": f"u{u}", "item_id": f"i{(u + k) % 7}", "event_type": "rating",
             "value": 1 + (u + k) % 5, "timestamp": start + timedelta(hours=u, minutes=10 * k)}
            for u in users for k in range(n_per_user)]
    return coerce_events(pd.DataFrame(rows), default_source="synthetic")


@pytest.mark.slow
def test_a_new_batch_reaches_the_online_store_and_the_offline_join_without_a_rebuild(tmp_path):
    settings = Settings(home=tmp_path / "home", max_seq_len=4, feast_project="incr")
    store = open_feature_store(settings)
    lake = Lake(tmp_path / "lake")
    lake.ingest(SourceFrames(events=_events(range(4), T0, 6, "a")), batch_id="b1")
    features_dir = settings.home / "features"
    now = datetime.now(UTC)
    old = lake.events()
    refresh_features(store, settings, old, None, None, now)
    write_state(features_dir, *full_state(old, ["b1"], old["timestamp"].max().to_pydatetime(), history_len=4))
    assert update_features(store, lake, features_dir, now, n=4) == {  # nothing new: nothing written
        "mode": "incremental", "new_events": 0, "touched_users": 0, "touched_items": 0, "window_events": 0,
        "rows": {}, "views": [], "watermark": read_watermark(features_dir).isoformat()}

    later = T0 + timedelta(days=3)
    lake.ingest(SourceFrames(events=_events(range(1, 3), later, 2, "b")), batch_id="b2")  # u1, u2: i1..i3
    summary = update_features(store, lake, features_dir, now, n=4)
    assert summary["mode"] == "incremental" and summary["new_events"] == 4 and summary["touched_users"] == 2
    assert len(list((features_dir / SOURCE_FILES["user_recent_items"]).glob("part-*.parquet"))) == 2
    assert read_state(features_dir)[0]["lake_batches"] == 2
    assert read_watermark(features_dir) == (later + timedelta(hours=2, minutes=10)).astimezone(UTC)

    online = OnlineFeatures(store, settings=settings, freshness_s=math.inf)
    everything = lake.events()
    for user in ("u1", "u2"):
        mine = everything[everything["user_id"] == user]
        assert online.recent_items(user) == mine["item_id"].tolist()[-4:]
        assert online.user_stats(user)["n_events"] == len(mine) == 8
    assert online.user_stats("u0")["n_events"] == 6  # untouched

    # the offline source folder (base part + the increment) answers point-in-time joins on both sides of it
    entity = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i1", "i1"],
                           "event_timestamp": [later - timedelta(seconds=1), later + timedelta(days=1)]})
    joined = store.get_historical_features(entity_df=entity, features=["user_stats:n_events"]).to_df()
    assert joined.sort_values("event_timestamp")["n_events"].tolist() == [6, 8]

    # a late event (ordered before what the tables hold) declines: the caller rebuilds in full
    lake.ingest(SourceFrames(events=_events(range(3, 4), T0 + timedelta(days=1), 1, "c")), batch_id="b3")
    assert update_features(store, lake, features_dir, now, n=4) is None


@pytest.mark.slow
def test_a_longer_history_reaches_every_users_online_list_without_new_events(recloop_home, monkeypatch) -> None:
    """A model that reads more (tuned max_seq_len) must see long lists also for users with no event since the
    last build: a materialisation writes only its time window, so the features task re-syncs every list."""
    import logging

    import flows.features as FF
    from recloop.settings import get_settings

    monkeypatch.setattr(FF, "get_run_logger", lambda: logging.getLogger("features-test"))  # the task's body alone
    monkeypatch.setenv("RECLOOP_MAX_SEQ_LEN", "4")
    monkeypatch.setenv("RECLOOP_FEAST_PROJECT", "grow")
    get_settings.cache_clear()
    settings = get_settings()
    Lake(settings.lake_path).ingest(SourceFrames(events=_events(range(3), T0, 8, "a")), batch_id="b1")
    FF.refresh_features_task.fn(None, None, 3600.0)
    online = OnlineFeatures(settings=settings)
    try:
        assert len(online.recent_items("u0")) == 4
        monkeypatch.setattr(FF, "materialised_history_len", lambda s, client=None: 6)  # a tuned model reads 6
        summary = FF.refresh_features_task.fn(None, None, 3600.0)  # no new event: an empty window
        assert summary["resync"]["users"] == 3
        assert [len(online.recent_items(f"u{u}")) for u in range(3)] == [6, 6, 6]
        assert read_state(settings.home / "features")[0]["history_len"] == 6
        # a failed read of the models' lengths (settings' 4) never shrinks what was written
        monkeypatch.setattr(FF, "materialised_history_len", lambda s, client=None: 4)
        assert "resync" not in FF.refresh_features_task.fn(None, None, 3600.0)
        assert len(online.recent_items("u1")) == 6 and read_state(settings.home / "features")[0]["history_len"] == 6
    finally:
        online.close()
