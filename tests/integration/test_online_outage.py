"""Online-store outages against a real Redis of the test's own (never the one on 6379).

``RecommenderCore`` runs in-process over a real ``OnlineFeatures`` (Feast on Redis, the repo applied
and a small synthetic lake materialised) and a SQLite ``EventLog``. The Redis is killed
(unreachable), frozen with SIGSTOP, restarted empty and flushed. Bounds checked: recommend answers
within 200 ms during an outage (the issue's bound, per call, measured with ``perf_counter``), feedback
stays acknowledged and idempotent, the status reports the outage, and the store is re-synced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from fakes import tiny_served
from fakes import wait_for as fake_wait_for

from serving.recommender import RecommenderCore

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

BOUND_MS = 200.0  # the bound for one recommend during an outage
N = 8  # max_seq_len
LAKE_START = datetime(2024, 1, 1, tzinfo=UTC)
LATENCIES: dict[str, list[float]] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProc:
    """A ``redis-server`` subprocess on a free port, without persistence (a restart comes back empty)."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir, self.proc = _free_port(), workdir, None

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.running:
            self.thaw()
            self.kill()


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory):
    proc = RedisProc(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.close()


def _lake_events() -> pd.DataFrame:
    from recloop.contract import coerce_events

    rows = [
        {"user_id": f"u{u}", "item_id": f"i{(u * 3 + j) % 50 + 1}", "event_type": "click",
         "timestamp": LAKE_START + timedelta(minutes=10 * u + j)}
        for u in range(20)
        for j in range(6)
    ]
    return coerce_events(pd.DataFrame(rows), default_source="test")


@pytest.fixture(scope="module")
def feast_env(redis_proc, tmp_path_factory):
    from featurestore.materialize import refresh_features
    from featurestore.online import open_feature_store
    from recloop.settings import Settings

    settings = Settings(
        home=tmp_path_factory.mktemp("outage_home"),
        online_store="redis",
        redis_url=f"127.0.0.1:{redis_proc.port}",
        feast_project=f"recloop_o{uuid.uuid4().hex[:8]}",
        max_seq_len=N,
    )
    store = open_feature_store(settings)
    events = _lake_events()
    refresh_features(store, settings, events, None, None, datetime.now(UTC))  # apply + materialise
    base = {
        u: (g["item_id"].tolist()[-N:], g["timestamp"].max().to_pydatetime())
        for u, g in events.sort_values("timestamp").groupby("user_id")
    }
    return SimpleNamespace(settings=settings, store=store, base=base)


@pytest.fixture()
def online(feast_env, redis_proc):
    from featurestore.online import OnlineFeatures

    if not redis_proc.running:
        redis_proc.start()
    features = OnlineFeatures(feast_env.store, settings=feast_env.settings, freshness_s=math.inf, breaker_s=0.5)
    yield features
    features.close()


def _served():
    return tiny_served(popularity={f"i{j}": float(j) for j in range(1, 51)}, max_seq_len=N)


@pytest.fixture()
def core(online, feast_env, tmp_path):
    from recloop.eventlog import EventLog

    log = EventLog(f"sqlite:///{tmp_path / 'eventlog.db'}")
    rc = RecommenderCore(_served(), online, log, max_seq_len=N, base_history=feast_env.base)
    rc.push_retry_s = 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the service does (serving/runtime.build_runtime)
    yield rc
    torch.set_num_threads(threads)
    rc.stop_online_sync()
    log.close()


def timed(name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    ms = (time.perf_counter() - t0) * 1000.0
    LATENCIES.setdefault(name, []).append(ms)
    return out, ms


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    fake_wait_for(predicate, timeout_s, poll_s=0.05)


def ids(out: dict) -> set[str]:
    return {x["item_id"] for x in out["items"]}


def _outage_checks(core: RecommenderCore, label: str, user: str, item: str, event_id: str) -> None:
    """During an outage: recommend within the bound with the fallback; feedback acknowledged, idempotent."""
    base_items = core.base_history[user][0]
    for _ in range(10):
        out, ms = timed(f"{label} recommend", core.recommend, user, 10)
        assert ms < BOUND_MS, f"recommend took {ms:.0f} ms during the outage"
        assert out["strategy"] == "fallback" and out["cold_start"] is False and len(out["items"]) == 10
        assert not set(base_items) & ids(out)  # the rebuilt history is the user's (seen items excluded)
    own, ms = timed(f"{label} recommend", core.recommend, "new-user", 5, True, ["i7", "i8"])
    assert ms < BOUND_MS and own["strategy"] == "fallback" and not {"i7", "i8"} & ids(own)
    first, ms1 = timed(f"{label} feedback", core.feedback, user, item, "click", event_id=event_id)
    again, ms2 = timed(f"{label} feedback", core.feedback, user, item, "click", event_id=event_id)
    assert first["degraded"] is True and first["inserted"] is True and first["event_id"] == event_id
    assert again["degraded"] is True and again["inserted"] is False and again["event_id"] == event_id
    assert ms1 < BOUND_MS and ms2 < BOUND_MS
    assert core.events.count() == 1
    out, ms = timed(f"{label} recommend", core.recommend, user, 10)
    assert ms < BOUND_MS and item not in ids(out)  # read-your-writes from the log through the outage
    status = core.online_status()
    assert status["reachable"] is False and status["pending_pushes"] == 1 and status["stale"] is True
    verdict, reason = ready_status(core)
    assert verdict == "degraded" and "online store unreachable" in reason and "1 online pushes pending" in reason


def ready_status(core: RecommenderCore) -> tuple[str, str | None]:
    """``/ready``'s status and reason, as the service computes them (``ChampionWatcher.status``)."""
    from recloop.settings import Settings
    from serving.runtime import ChampionWatcher, Runtime

    _, ok_online = core.ping_stores()
    watcher = ChampionWatcher(Runtime(Settings(), None, core, {}, {}))
    return watcher.status(True, ok_online)


def _recovered_checks(core: RecommenderCore, user: str, item: str) -> None:
    online = core.online
    expected = (core.base_history[user][0] + [item])[-N:]
    wait_for(lambda: core.pending_pushes == 0 and online.recent_items(user) == expected)
    out = core.recommend(user, k=10)
    assert out["strategy"] == "sequential" and item not in ids(out)
    status = core.online_status()
    assert status["reachable"] and not status["empty"] and status["pending_pushes"] == 0
    assert not status["circuit_open"]
    assert core.feedback(user, "i44", "click")["degraded"] is False


def test_unreachable_redis_degrades_fast_and_recovers_after_an_empty_restart(core, redis_proc, feast_env):
    core.start_online_sync(check_interval_s=0.3)  # start-up: the materialised store has no sentinel yet
    assert core.online.recent_items("u1") == feast_env.base["u1"][0]
    assert core.recommend("u1", k=10)["strategy"] == "sequential"
    redis_proc.kill()
    _outage_checks(core, "unreachable", "u1", "i40", "down-1")
    redis_proc.start()  # without persistence: back empty
    _recovered_checks(core, "u1", "i40")  # the owed push lands, then the emptied store is re-synced
    wait_for(lambda: core.online.recent_items("u7") == feast_env.base["u7"][0])


def test_frozen_redis_degrades_fast_and_recovers_after_sigcont(core, redis_proc):
    core.start_online_sync(check_interval_s=0.3)
    assert core.recommend("u2", k=10)["strategy"] == "sequential"
    redis_proc.freeze()
    try:
        _outage_checks(core, "frozen", "u2", "i41", "frozen-1")
    finally:
        redis_proc.thaw()
    _recovered_checks(core, "u2", "i41")


def test_emptied_redis_is_reported_and_resynced(core, redis_proc, feast_env):
    core.resync_online()
    assert core.online_status()["empty"] is False
    redis_proc.client().flushall()
    status = core.online_status()
    assert status["empty"] is True and status["reachable"] is True
    verdict, reason = ready_status(core)
    assert verdict == "degraded" and "online store empty" in reason
    assert core.recommend("u3", k=5)["cold_start"] is True  # what an emptied store does to every user
    report = core.resync_if_empty()
    assert report["users"] == 20 and core.resync_if_empty() is None
    assert core.online.recent_items("u3") == feast_env.base["u3"][0]
    assert core.online_status()["empty"] is False and ready_status(core) == ("ok", None)
    # While serving: the background check finds the store emptied again and re-syncs it.
    core.start_online_sync(check_interval_s=0.2, resync_now=False)
    redis_proc.client().flushall()
    wait_for(lambda: core.online.recent_items("u4") == feast_env.base["u4"][0])


def test_recloop_online_resync_command(feast_env, redis_proc, online, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app
    from recloop.eventlog import EventLog
    from recloop.settings import get_settings

    s = feast_env.settings
    log = EventLog(s.event_log_uri)  # the command's log: <home>/eventlog.db
    log.append_one("cli-user", "i3", "click")
    log.append_one("cli-user", "i4", "click")
    log.close()
    for key, value in {"HOME": s.home, "ONLINE_STORE": "redis", "REDIS_URL": s.redis_url,
                       "FEAST_PROJECT": s.feast_project, "MAX_SEQ_LEN": N}.items():
        monkeypatch.setenv(f"RECLOOP_{key}", str(value))
    get_settings.cache_clear()
    redis_proc.client().flushall()
    try:
        result = CliRunner().invoke(app, ["online", "resync", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["log_users"] == 1  # no lake in this home: the log's users only
    assert online.recent_items("cli-user") == ["i3", "i4"]


def test_call_guard_deadline_and_circuit_breaker():
    from featurestore.online import CallGuard, OnlineStoreUnavailable

    now = [100.0]
    guard = CallGuard(0.05, breaker_s=5.0, clock=lambda: now[0])
    calls = []

    def fail():
        calls.append("fail")
        raise ConnectionError("refused")

    assert guard.call(lambda: 7) == 7
    with pytest.raises(OnlineStoreUnavailable, match="refused"):
        guard.call(fail)
    assert guard.circuit_open and "refused" in guard.last_error
    with pytest.raises(OnlineStoreUnavailable, match="skipped"):
        guard.call(fail)  # skipped: the store is not touched while the circuit is open
    assert calls == ["fail"]
    now[0] += 5.1  # half-open: the next call is a trial, and its success closes the circuit
    assert guard.call(lambda: 8) == 8 and not guard.circuit_open
    t0 = time.perf_counter()
    with pytest.raises(OnlineStoreUnavailable, match="no answer within 50 ms"):
        guard.call(time.sleep, 0.3)  # slow, not failed: the caller gives up at the deadline
    assert time.perf_counter() - t0 < 0.25 and not guard.circuit_open
    with pytest.raises(ValueError):
        guard.call(int, "x")  # a bad argument is not an outage
    assert not guard.circuit_open
    guard.close()


def test_report_latencies():
    """Prints the measured latencies (run with -s); always passes."""
    for name, values in LATENCIES.items():
        print(f"{name}: n={len(values)} max={max(values):.1f} ms median={sorted(values)[len(values) // 2]:.1f} ms")
