"""RecommenderCore over an online store that fails (fakes, no Feast): fallback, degraded feedback,
owed pushes drained in order, emptiness and re-sync. The same paths over a real Redis of the test's
own: tests/integration/test_online_outage.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fakes import MemoryLog, tiny_served, wait_for

from serving.recommender import SENTINEL_USER, RecommenderCore, resync_online

LAKE_TS = datetime(2024, 1, 1, tzinfo=UTC)
POPULARITY = {f"i{j}": float(j) for j in range(1, 51)}


class FlakyOnline:
    """An online store that can be switched down (every call raises, like a dead Redis)."""

    def __init__(self, rows: dict[str, list[str]] | None = None) -> None:
        self.rows = dict(rows or {})
        self.down = False
        self.pushes: list[tuple[str, list[str]]] = []
        self.stamps: dict[str, datetime] = {}

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("online store down")

    def recent_items(self, user_id: str) -> list[str] | None:
        self._check()
        return self.rows.get(user_id)

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> bool:
        self._check()
        self.rows[user_id] = list(items)
        self.pushes.append((user_id, list(items)))
        self.stamps[user_id] = event_ts
        return True


@pytest.fixture()
def setup():
    base = {"u1": (["i1", "i2", "i3"], LAKE_TS), "u2": (["i4", "i5"], LAKE_TS)}
    online = FlakyOnline({"u1": ["i1", "i2", "i3"], "u2": ["i4", "i5"]})
    log = MemoryLog()
    core = RecommenderCore(tiny_served(popularity=POPULARITY), online, log, max_seq_len=4, base_history=base)
    core.push_retry_s = 0.02
    yield core, online, log
    core.stop_online_sync()


def test_recommend_falls_back_to_the_history_rebuilt_from_lake_and_log(setup) -> None:
    core, online, log = setup
    log.append_and_recent({"event_id": "e", "user_id": "u1", "item_id": "i9", "timestamp": LAKE_TS + timedelta(1)}, 4)
    online.down = True
    out = core.recommend("u1", k=10)
    assert out["strategy"] == "fallback" and out["cold_start"] is False
    assert not {"i1", "i2", "i3", "i9"} & {x["item_id"] for x in out["items"]}
    assert core.history_from_sources("u1") == ["i1", "i2", "i3", "i9"]  # lake + log tail, last max_seq_len
    own = core.recommend("new", k=5, history=["i7", "i8"])  # a request with its own history still answers
    assert own["strategy"] == "fallback" and own["cold_start"] is True
    assert not {"i7", "i8"} & {x["item_id"] for x in own["items"]}
    cold = core.recommend("nobody", k=3)
    assert cold["strategy"] == "fallback" and cold["cold_start"] is True
    assert [x["item_id"] for x in cold["items"]] == ["i50", "i49", "i48"]  # popularity
    online.down = False
    assert core.recommend("u1", k=3)["strategy"] == "sequential"


def test_feedback_is_acknowledged_degraded_and_pushed_in_order_when_the_store_returns(setup) -> None:
    core, online, log = setup
    online.down = True
    first = core.feedback("u1", "i10", "click", event_id="a")
    again = core.feedback("u1", "i10", "click", event_id="a")
    assert first["degraded"] is True and first["inserted"] is True and first["event_id"] == "a"
    assert again["degraded"] is True and again["inserted"] is False and len(log.rows) == 1
    core.feedback("u1", "i11", "click", event_id="b")
    assert core.pending_pushes == 1  # one owed push per user, whatever the number of events
    # Read-your-writes through the outage: the rebuilt history has the events.
    assert not {"i10", "i11"} & {x["item_id"] for x in core.recommend("u1", k=20)["items"]}
    status = core.online_status()
    assert status["reachable"] is False and status["pending_pushes"] == 1 and status["stale"] is True
    online.down = False
    # The store is back but owes u1 a push: u1 is still read from the sources until it lands.
    assert core.recommend("u1", k=3)["strategy"] == "fallback"
    wait_for(lambda: core.pending_pushes == 0)
    assert online.rows["u1"] == ["i2", "i3", "i10", "i11"]  # derived from the log, last max_seq_len
    assert core.recommend("u1", k=3)["strategy"] == "sequential"
    ok = core.feedback("u1", "i12", "click")
    assert ok["degraded"] is False and online.rows["u1"][-1] == "i12"


def test_an_emptied_store_is_reported_and_resynced_with_log_users(setup) -> None:
    core, online, log = setup
    log.append_and_recent({"event_id": "x", "user_id": "log-only", "item_id": "i7", "timestamp": LAKE_TS}, 4)
    assert core.online_status()["empty"] is True  # no sentinel yet
    report = core.resync_if_empty()
    assert report is not None and report["users"] == 2  # the fake log cannot list its users
    assert online.rows[SENTINEL_USER] == [] and not core.online_status()["empty"]
    online.rows.clear()  # e.g. FLUSHALL
    assert core.online_status()["empty"] is True
    assert core.start_online_sync(check_interval_s=60.0)["users"] == 2
    assert online.rows["u2"] == ["i4", "i5"] and core.resync_if_empty() is None


def test_resync_covers_users_found_only_in_an_event_log(tmp_path) -> None:
    from recloop.eventlog import EventLog

    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    online = FlakyOnline()
    log.append_one("log-only", "i7", "click")
    log.append_one("u1", "i9", "click")
    base = {"u1": (["i1", "i2"], LAKE_TS), "lake-only": (["i5"], LAKE_TS)}
    report = resync_online(online, log, base, 3)
    assert report["users"] == 3 and report["log_users"] == 2
    assert online.rows["log-only"] == ["i7"] and online.rows["u1"] == ["i1", "i2", "i9"]
    assert online.rows["lake-only"] == ["i5"] and SENTINEL_USER in online.rows
    # A lake-only list keeps the lake's time (the read freshness limit still applies); one with
    # log events is stamped now, as feedback stamps its pushes.
    assert online.stamps["lake-only"] == LAKE_TS and online.stamps["u1"] > LAKE_TS + timedelta(days=365)
