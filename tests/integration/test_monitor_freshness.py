"""Feature freshness: a blocked online-store write is caught by the monitor's first run after the lag bound.

A real Feast SQLite online store (applied and materialised from a small lake) serves ``RecommenderCore``;
feedback goes through the core into a real event log. Then the store's push is made to fail (a store whose
writes are blocked): the feedback is still acknowledged (degraded, the push owed) and the freshness check
reports the user as behind; once writes work again the owed push lands and the check is clean.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from fakes import tiny_served, wait_for

pytestmark = pytest.mark.slow  # ~20 s: Feast apply and materialisation
N = 8
LAG_S = 0.5
LAKE_START = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture()
def served_core(tmp_path):
    from featurestore.materialize import refresh_features
    from featurestore.online import OnlineFeatures, open_feature_store
    from recloop.contract import coerce_events
    from recloop.eventlog import EventLog
    from recloop.settings import Settings
    from serving.recommender import RecommenderCore

    settings = Settings(home=tmp_path / "home", online_store="sqlite", feast_project=f"fresh{uuid.uuid4().hex[:8]}",
                        max_seq_len=N, monitor_freshness_max_lag_s=LAG_S)
    rows = [{"user_id": f"u{u}", "item_id": f"i{(u * 3 + j) % 50 + 1}", "event_type": "click",
             "timestamp": LAKE_START + timedelta(minutes=10 * u + j)} for u in range(6) for j in range(4)]
    events = coerce_events(pd.DataFrame(rows), default_source="test")
    store = open_feature_store(settings)
    refresh_features(store, settings, events, None, None, datetime.now(UTC))
    base = {u: (g["item_id"].tolist()[-N:], g["timestamp"].max().to_pydatetime())
            for u, g in events.sort_values("timestamp").groupby("user_id")}
    online = OnlineFeatures(store, settings=settings, freshness_s=math.inf, breaker_s=0.2)
    log = EventLog(settings.event_log_uri)
    core = RecommenderCore(tiny_served(max_seq_len=N), online, log, max_seq_len=N, base_history=base)
    core.push_retry_s = 0.1
    # The monitor runs in its own process (the flow) with its own store client: its own deadline and circuit
    # breaker, which the serving core's failing pushes do not open. A generous deadline: the check must not
    # read a loaded machine's slow reads as an unreachable store.
    watcher = OnlineFeatures(store, settings=settings, freshness_s=math.inf, timeout_s=10.0)
    yield settings, core, watcher
    core.stop_online_sync()
    watcher.close()
    online.close()
    log.close()


def test_blocked_online_write_is_caught_within_one_interval(served_core, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.watch import freshness_task

    settings, core, online = served_core
    assert core.feedback("u1", "i7", "click")["degraded"] is False
    time.sleep(LAG_S + 0.1)
    healthy = freshness_task.fn(settings, online)
    assert healthy["status"] == "ok" and healthy["users_checked"] == 1 and healthy["users_behind"] == 0

    real_push = online.store.push  # the store object the serving core pushes to (shared with the watcher)

    def blocked(*args, **kwargs):
        raise ConnectionError("online store write blocked")

    monkeypatch.setattr(online.store, "push", blocked)
    assert core.feedback("u2", "i9", "click")["degraded"] is True  # acknowledged, the push is owed
    assert core.feedback("u1", "i8", "skip")["degraded"] is True  # a skip changes no list: u1 stays current
    time.sleep(LAG_S + 0.1)
    caught = freshness_task.fn(settings, online)  # the first run after the lag bound
    assert caught["status"] == "stale" and caught["alert"] is True
    assert caught["behind"] == ["u2"] and caught["users_checked"] == 2
    assert caught["lag_s"] >= LAG_S
    assert pd.Timestamp(caught["log_newest"]) > pd.Timestamp(caught["online_newest"])  # the store lags the log

    monkeypatch.setattr(online.store, "push", real_push)  # writes work again: the owed push lands
    wait_for(lambda: core.pending_pushes == 0, timeout_s=10)
    recovered = freshness_task.fn(settings, online)
    assert recovered["status"] == "ok" and recovered["users_behind"] == 0
