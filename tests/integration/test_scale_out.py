"""Read-your-writes across processes: two ``bentoml serve`` services (one with ``workers=2``) on one PostgreSQL
event log and one Redis online store (the production profile), 500 rounds each way.

Each round sends a click to one process and asks another (or the same multi-worker service) for the user's
next recommendation right after the acknowledgement. "Reflected" is checked exactly: the answer equals the
answer for an explicit ``history`` equal to the log's last ``max_seq_len`` items (the user is new, so the
history is the log's tail), so the stored online list is the newest one whichever process pushed it. A
third phase races two clicks for the same user on both processes at once: after both acknowledgements
both items must be in the served history (an older push overwriting a newer one would drop one).

Isolation: a fresh PostgreSQL database and a fresh Feast project (Redis key suffix) per run, dropped after.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from bench.serving import free_port, materialize_features, running_server, serving_env, train_and_register
from recloop.settings import Settings, get_settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

ROUNDS = 500
SEQ = 20


def _admin_url() -> str:
    return Settings().postgres_url


@pytest.fixture(scope="module")
def two_services(ml100k_path: Path, tmp_path_factory: pytest.TempPathFactory):
    import redis

    from recloop.eventlog import EventLog
    from recloop.sources import load_source

    tag = uuid.uuid4().hex[:10]
    db = f"recloop_ryw_{tag}"
    admin_url = _admin_url()
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db}"'))
        r = redis.Redis.from_url(f"redis://{Settings().redis_url}")
        r.ping()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"PostgreSQL or Redis not reachable: {err}")
    base_url = admin_url.rsplit("/", 1)[0]
    home = tmp_path_factory.mktemp("scale") / "home"
    env = serving_env(home, RECLOOP_EVENT_LOG_URL=f"{base_url}/{db}",
                      RECLOOP_ONLINE_STORE="redis", RECLOOP_FEAST_PROJECT=f"ryw{tag}",
                      RECLOOP_MAX_SEQ_LEN=str(SEQ),
                      # deadlines for a loaded 2-core machine: this is about ordering, not latency (a late
                      # push is acknowledged degraded=True, by design, and would end the check)
                      RECLOOP_ONLINE_WRITE_TIMEOUT_MS="5000", RECLOOP_ONLINE_TIMEOUT_MS="2000")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            get_settings.cache_clear()
            frames = load_source("movielens-100k", ml100k_path)
            keep = frames.events["user_id"].astype(str).isin([str(u) for u in range(1, 101)])
            events = frames.events[keep]  # 100 users: a small lake, the same code path
            train_and_register(events, frames.items, seed=0, seconds=5.0)
            log = EventLog(get_settings().event_log_uri)
            log.append(events)
            log.close()
            materialize_features(events)
            with ExitStack() as stack:  # both start at once: about one start-up time
                ports = free_port(), free_port()
                starts = [lambda p=ports[0]: running_server({**env, "RECLOOP_SERVE_WORKERS": "2"}, p,
                                                           home / "serve-a.log"),
                          lambda p=ports[1]: running_server(env, p, home / "serve-b.log")]
                bases: list[str] = [""] * 2
                errors: list[BaseException] = []
                entering = threading.Lock()

                def start(i: int) -> None:
                    try:
                        server = starts[i]()
                        base = server.__enter__()  # noqa: PLC2801 - waits for /readyz (the slow part)
                        with entering:
                            stack.push(server.__exit__)
                        bases[i] = base
                    except BaseException as err:  # noqa: BLE001
                        errors.append(err)

                threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]
                with httpx.Client(base_url=bases[0], timeout=30) as a, httpx.Client(base_url=bases[1],
                                                                                      timeout=30) as b:
                    yield {"a": a, "b": b, "items": sorted(set(events["item_id"].astype(str)))}
            get_settings.cache_clear()
    finally:
        get_settings.cache_clear()
        for key in r.scan_iter(match=f"*ryw{tag}*"):
            r.delete(key)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def _log_tail(user: str) -> list[str]:
    from recloop.eventlog import EventLog

    log = EventLog(get_settings().event_log_uri)
    try:
        return list(log.recent_items(user, SEQ))
    finally:
        log.close()


def _answer(client: httpx.Client, user: str, history: list[str] | None = None) -> list[tuple[str, float]]:
    body = {"user_id": user, "k": 10, **({"history": history} if history is not None else {})}
    resp = client.post("/recommend", json=body)
    assert resp.status_code == 200, resp.text
    return [(x["item_id"], round(x["score"], 4)) for x in resp.json()["items"]]


def _click(client: httpx.Client, user: str, item: str) -> None:
    resp = client.post("/feedback", json={"user_id": user, "item_id": item, "event_type": "click"})
    assert resp.status_code == 200 and resp.json()["degraded"] is False, resp.text


@pytest.mark.parametrize("route", ["a_to_b", "a_to_a_two_workers"])
def test_feedback_on_one_process_is_reflected_by_the_next_recommend_on_another(two_services, route: str) -> None:
    writer = two_services["a"]
    reader = two_services["b"] if route == "a_to_b" else two_services["a"]
    items = two_services["items"]
    user = f"ryw-{route}-{uuid.uuid4().hex[:6]}"
    stale = 0
    for i in range(ROUNDS):
        item = items[(7 * i) % len(items)]
        _click(writer, user, item)
        served = _answer(reader, user)
        expected = _answer(reader, user, history=_log_tail(user))
        stale += served != expected
    assert stale == 0, f"{stale} of {ROUNDS} answers did not reflect the acknowledged click"


def test_racing_clicks_on_two_processes_both_reach_the_online_history(two_services) -> None:
    a, b, items = two_services["a"], two_services["b"], two_services["items"]
    lost = 0
    for i in range(ROUNDS // 5):
        user = f"race-{uuid.uuid4().hex[:8]}"
        pair = items[(11 * i) % len(items)], items[(11 * i + 5) % len(items)]
        threads = [threading.Thread(target=_click, args=(c, user, item)) for c, item in zip((a, b), pair,
                                                                                           strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tail = _log_tail(user)
        assert sorted(tail) == sorted(pair)
        for reader in (a, b):
            lost += _answer(reader, user) != _answer(reader, user, history=tail)
    assert lost == 0, f"{lost} answers missed one of two acknowledged concurrent clicks"
