"""Feast end to end on real ml-100k, on the SQLite AND the Redis online store.

One store per backend per module (Feast import and setup are the expensive part): the lake is
ml-100k plus a few edge-case users, tables are written, the repo applied and materialised.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from featurestore.materialize import (
    historical_features,
    load_text_encoder,
    read_watermark,
    refresh_features,
    training_entity_frame,
)
from featurestore.online import OnlineFeatures, open_feature_store
from recloop.contract import coerce_events
from recloop.settings import Settings
from recloop.sources import load_source

N = 50
FUTURE_TS = pd.Timestamp("2100-01-01", tz="UTC")


def _require_redis(url: str) -> None:
    import redis

    host, port = url.split(",")[0].split(":")
    try:
        redis.Redis(host=host, port=int(port), socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError as err:
        pytest.skip(f"Redis not reachable at {url}: {err}")


def _ordered_items(events: pd.DataFrame, user_id: str) -> list[str]:
    mine = events[events["user_id"] == user_id].reset_index(drop=True)
    order = np.lexsort((np.arange(len(mine)), mine["timestamp"].to_numpy()))
    return mine["item_id"].to_numpy()[order].tolist()


@pytest.fixture(scope="module")
def lake(ml100k_path) -> SimpleNamespace:
    frames = load_source("movielens-100k", ml100k_path)
    extra = coerce_events(
        pd.DataFrame(
            {
                "user_id": ["solo", "future"],
                "item_id": ["50", "1"],
                "event_type": ["click", "click"],
                "timestamp": [pd.Timestamp("1998-01-01", tz="UTC"), FUTURE_TS],
            }
        ),
        default_source="test",
    )
    events = pd.concat([frames.events, extra], ignore_index=True)
    return SimpleNamespace(events=events, items=frames.items)


class _MemoEncoder:
    """The real packaged encoder, remembering vectors so both backends embed the catalogue once."""

    def __init__(self) -> None:
        self.model, self.memo = load_text_encoder(), {}

    def encode(self, sentences: list[str], **kwargs: object) -> np.ndarray:
        missing = [t for t in dict.fromkeys(sentences) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self.model.encode(missing, **kwargs), strict=True))
        return np.stack([self.memo[t] for t in sentences])


@pytest.fixture(scope="module")
def encoder() -> _MemoEncoder:
    return _MemoEncoder()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def env(request, lake, encoder, tmp_path_factory) -> SimpleNamespace:
    backend = request.param
    settings = Settings(
        home=tmp_path_factory.mktemp(f"feast_{backend}"),
        online_store=backend,
        feast_project=f"recloop_t{uuid.uuid4().hex[:10]}",  # own Redis key suffix per run
        max_seq_len=N,
    )
    if backend == "redis":
        _require_redis(settings.redis_url)
    store = open_feature_store(settings)
    now = datetime.now(UTC)
    summary = refresh_features(store, settings, lake.events, lake.items, encoder, now)
    online = OnlineFeatures(store, settings=settings, freshness_s=math.inf)
    yield SimpleNamespace(
        backend=backend, settings=settings, store=store, online=online, summary=summary, now=now
    )
    store.teardown()  # drops the SQLite tables / this project's Redis keys


def test_user1_online_recent_items_are_the_last_n_lake_items_in_order(env, lake):
    expected = _ordered_items(lake.events, "1")[-N:]
    assert len(expected) == N
    assert env.online.recent_items("1") == expected


def test_user_stats_match_the_lake(env, lake):
    mine = lake.events[lake.events["user_id"] == "1"]
    stats = env.online.user_stats("1")
    assert stats["n_events"] == len(mine) == 272
    assert stats["n_distinct_items"] == mine["item_id"].nunique()
    assert stats["mean_rating"] == pytest.approx(mine["value"].mean())
    assert stats["last_event_ts"] == mine["timestamp"].max().to_pydatetime()


def test_single_event_user_unknown_user_and_empty_push(env):
    assert env.online.recent_items("solo") == ["50"]
    assert env.online.user_stats("solo")["n_events"] == 1
    assert env.online.user_stats("solo")["mean_rating"] is None  # a click has no rating (NaN -> None)
    unknown = env.online.user("never-seen")
    assert unknown.recent_item_ids is None and unknown.stats is None and not unknown.stale
    assert env.online.push_recent_items("empty-history", [], env.now)
    assert env.online.recent_items("empty-history") == []


def test_push_is_read_back_and_an_older_push_cannot_overwrite_it(env):
    before = env.online.recent_items("2")
    fresh = [*before[1:], "1682"]
    assert env.online.push_recent_items("2", fresh, env.now)
    assert env.online.recent_items("2") == fresh
    assert not env.online.push_recent_items("2", ["stale"], env.now - timedelta(days=1))
    assert env.online.recent_items("2") == fresh


def test_freshness_limit_hides_rows_older_than_the_limit(env):
    strict = OnlineFeatures(env.store, settings=env.settings, freshness_s=30 * 86400.0)
    state = strict.user("1")  # ml-100k ends in 1998: far older than 30 days
    assert state.stale and state.recent_item_ids is None and state.stats is None
    assert strict.push_recent_items("fresh-user", ["7"], datetime.now(UTC))
    assert strict.recent_items("fresh-user") == ["7"]


def test_future_event_never_goes_online_nor_moves_the_watermark(env, lake):
    assert env.online.recent_items("future") is None
    real_max = lake.events.loc[lake.events["timestamp"] < FUTURE_TS, "timestamp"].max()
    assert read_watermark(env.settings.home / "features") == real_max.to_pydatetime()
    assert env.summary["end"] == real_max.isoformat()


def test_item_features_online(env, lake):
    df = env.online.item_features(["1", "no-such-item"])
    toy = df.iloc[0]
    past = lake.events[lake.events["timestamp"] < FUTURE_TS]  # the 2100 event is not online
    assert toy["item_stats__popularity"] == (past["item_id"] == "1").sum()
    emb = np.asarray(toy["item_content__embedding"], dtype=np.float32)
    assert emb.shape == (384,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-3)
    assert list(toy["item_content__genres"]) == ["Animation", "Children's", "Comedy"]
    assert df.iloc[1]["item_content__embedding"] is None


def test_point_in_time_rows_never_see_later_feature_values(env, lake):
    if env.backend != "sqlite":
        pytest.skip("the offline store is the same for both backends")
    ev = lake.events[lake.events["user_id"] == "1"].reset_index(drop=True)
    ev = ev.iloc[np.lexsort((np.arange(len(ev)), ev["timestamp"].to_numpy()))].reset_index(drop=True)
    targets = ev.iloc[[0, 60, 150, 271]]  # first event, middle, last
    frame = historical_features(env.store, training_entity_frame(targets), env.settings.feature_service)
    assert len(frame) == len(targets)  # aligned row for row, even the row with no earlier features
    for row, (_, target) in zip(frame.itertuples(), targets.iterrows(), strict=True):
        before = ev[ev["timestamp"] < target["timestamp"]]  # strictly earlier: no same-second ties
        got = row.user_recent_items__recent_item_ids
        if len(before) == 0:
            assert not isinstance(got, list | np.ndarray) and pd.isna(got)
            assert pd.isna(row.user_stats__n_events)
            continue
        assert list(got) == before["item_id"].tolist()[-N:]
        assert row.user_stats__n_events == len(before)  # later rows (up to 272) never joined
        item_before = lake.events[
            (lake.events["item_id"] == target["item_id"]) & (lake.events["timestamp"] < target["timestamp"])
        ]
        if len(item_before):
            assert row.item_stats__popularity == len(item_before)
