"""The real ``bentoml serve serving.service:Recommender`` on a loopback port, with an ml-100k champion.

One server per module (start-up takes ~30-60 s, set-up ~60 s): recommend, read-your-writes feedback,
no lost updates under 8 concurrent clients, 20+ kinds of bad request, a champion swap under load.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import httpx
import pytest
from fakes import wait_for

from bench.serving import free_port, prepare_home, running_server, serving_env, train_and_register
from recloop.settings import get_settings
from serving.explain import DEFAULT_VERB, VERBS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ml100k_path: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("serving") / "home"
    env = serving_env(home)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        prep = prepare_home(ml100k_path, seconds=10.0)
        with running_server(env, free_port(), home / "serve.log") as base:
            with httpx.Client(base_url=base, timeout=30) as client:
                yield {"client": client, "base": base, "home": home, **prep}
        get_settings.cache_clear()


def _log():
    from recloop.eventlog import EventLog

    return EventLog(get_settings().event_log_uri)


def test_recommend_returns_k_distinct_unseen_items_with_the_champion_version(server) -> None:
    body = server["client"].post("/recommend", json={"user_id": "1", "k": 20}).json()
    ids = [x["item_id"] for x in body["items"]]
    assert len(ids) == 20 and len(set(ids)) == 20
    seen = set(_log().recent_items("1", get_settings().max_seq_len))
    assert not seen & set(ids)
    assert body["model_version"] == server["version"] and body["cold_start"] is False
    assert body["strategy"] == "sequential" and all(x["title"] for x in body["items"])


def test_feedback_is_reflected_by_the_very_next_recommend(server) -> None:
    client = server["client"]
    before = client.post("/recommend", json={"user_id": "7", "k": 10}).json()
    item = before["items"][0]["item_id"]
    ack = client.post("/feedback", json={"user_id": "7", "item_id": item, "event_type": "click"})
    assert ack.status_code == 200 and ack.json()["inserted"] is True
    after = client.post("/recommend", json={"user_id": "7", "k": 10}).json()
    assert item not in [x["item_id"] for x in after["items"]]
    assert [x["score"] for x in after["items"]] != [x["score"] for x in before["items"]]


def test_800_concurrent_feedback_events_lose_no_update(server) -> None:
    from featurestore.online import OnlineFeatures

    user = f"hammer-{uuid.uuid4().hex[:8]}"
    items = [str(i) for i in range(1, 200)]
    failures: list[int] = []

    def client_thread(c: int) -> None:
        with httpx.Client(base_url=server["base"], timeout=30) as http:
            for j in range(100):
                item = items[(c * 100 + j) % len(items)]
                r = http.post("/feedback", json={"user_id": user, "item_id": item,
                                                 "event_type": "view", "event_id": f"{user}-{c}-{j}"})
                if r.status_code != 200:
                    failures.append(r.status_code)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    n = get_settings().max_seq_len
    log = _log()
    assert len(log.recent_items(user, 10_000)) == 800
    online = OnlineFeatures(settings=get_settings()).recent_items(user)
    assert online == log.recent_items(user, n) and len(online) == n


BIG = "x" * 1_000_000
BAD_REQUESTS = [
    ("recommend", {"k": 3}, 400, "user_id"),
    ("recommend", {"user_id": "1", "k": 0}, 400, "k"),
    ("recommend", {"user_id": "1", "k": 10**6}, 400, "k"),
    ("recommend", {"user_id": "1", "k": "ten"}, 400, "k"),
    ("recommend", {"user_id": "1", "k": 2.5}, 400, "k"),
    ("recommend", {"user_id": 123}, 400, "user_id"),
    ("recommend", {"user_id": ""}, 400, "user_id"),
    ("recommend", {"user_id": "u" * 300}, 400, "user_id"),
    ("recommend", {"user_id": BIG}, 413, "exceeds"),
    ("recommend", {"user_id": "1", "exclude_seen": "yes"}, 400, "exclude_seen"),
    ("recommend", {"user_id": "1", "history": "50"}, 400, "history"),
    ("recommend", {"user_id": "1", "history": ["1"] * 201}, 400, "history"),
    ("recommend", {"user_id": "1", "colour": "red"}, 400, "colour"),
    ("recommend", b"{not json", 400, "json"),
    ("recommend", b"[1, 2]", 400, ""),
    ("feedback", {"user_id": "1", "item_id": "50"}, 400, "event_type"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "smash"}, 400, "event_type"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "rating", "value": "five"}, 400, "value"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "view", "timestamp": "yesterday"}, 400,
     "timestamp"),
    ("feedback", {"user_id": "1", "event_type": "view"}, 400, "item_id"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "rating", "value": 99}, 400, "rating range"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "rating"}, 400, "needs a value"),
    ("feedback", {"user_id": "u\u202e1", "item_id": "50", "event_type": "view"}, 400, "user_id"),
    ("feedback", {"user_id": "u\u00001", "item_id": "50", "event_type": "view"}, 400, "user_id"),
    ("feedback", {"user_id": "1", "item_id": "\u200b", "event_type": "view"}, 400, "item_id"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "view", "timestamp": "9999-12-31T00:00:00Z"},
     400, "timestamp"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "view", "timestamp": "0001-01-01T00:00:00Z"},
     400, "timestamp"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "view", "event_id": "e\u0007"}, 400, "event_id"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "click", "request_id": "r\u0007"}, 400,
     "request_id"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "click", "request_id": "r" * 65}, 400,
     "request_id"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "click", "request_id": "r1", "position": 0}, 400,
     "position"),
    ("feedback", {"user_id": "1", "item_id": "50", "event_type": "click", "request_id": "r1", "position": "2"},
     400, "position"),
    ("similar_items", {"item_id": "no-such-item"}, 400, "item_id"),
    ("similar_items", {"item_id": "50", "k": -1}, 400, "k"),
    ("items", {"item_id": "n-1"}, 400, "title"),
    ("items", {"item_id": "n-1", "title": "bell\u0007"}, 400, "title"),
    ("items", {"item_id": "n\u0007", "title": "ok"}, 400, "item_id"),
]


@pytest.mark.parametrize(("endpoint", "payload", "status", "field"), BAD_REQUESTS)
def test_bad_request_gets_a_4xx_naming_the_field(server, endpoint, payload, status, field) -> None:
    client = server["client"]
    if isinstance(payload, bytes):
        r = client.post(f"/{endpoint}", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post(f"/{endpoint}", json=payload)
    assert r.status_code == status, r.text[:500]
    assert field.lower() in r.text.lower()


def test_content_type_host_and_metrics_rules(server) -> None:
    client = server["client"]
    form = client.post("/feedback", content=b"user_id=1", headers={"content-type": "multipart/form-data; boundary=x"})
    assert form.status_code == 415 and "application/json" in form.text
    bare = client.post("/recommend", content=b'{"user_id": "1", "k": 3}', headers={"content-type": ""})
    assert bare.status_code == 200 and len(bare.json()["items"]) == 3  # a missing content type is JSON
    assert client.post("/recommend", json={"user_id": "1"}, headers={"host": "evil.example"}).status_code == 400
    for i in range(40):
        client.post(f"/scan-{uuid.uuid4().hex}-{i}", json={})
    metrics = client.get("/metrics").text
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in metrics.splitlines() if 'endpoint="' in line}
    assert not any(e.startswith("/scan-") for e in endpoints) and "/other" in endpoints


def test_unknown_user_and_unknown_item_take_the_documented_fallbacks(server) -> None:
    client = server["client"]
    cold = client.post("/recommend", json={"user_id": "never-seen", "k": 5}).json()
    assert cold["cold_start"] is True and cold["strategy"] == "popularity" and len(cold["items"]) == 5
    assert cold["items"][0]["item_id"] == "50"  # the most-rated ml-100k movie (Star Wars)
    hist = client.post("/recommend", json={"user_id": "never-seen", "k": 5, "history": ["50", "181"]}).json()
    assert hist["cold_start"] is True and hist["strategy"] == "history"
    assert not {"50", "181"} & {x["item_id"] for x in hist["items"]}
    user = f"new-{uuid.uuid4().hex[:6]}"
    ack = client.post("/feedback", json={"user_id": user, "item_id": "brand-new-movie", "event_type": "like"})
    assert ack.status_code == 200 and ack.json()["known_item"] is False
    assert _log().recent_items(user, 5) == ["brand-new-movie"]


def _exposures():
    from recloop.exposures import ExposureLog

    return ExposureLog(get_settings().event_log_uri)


def test_every_answer_is_an_exposure_and_feedback_joins_it(server) -> None:
    """recommend returns a request_id; the answer lands in the exposure log (off the request path);
    a feedback carrying it (and the position) is linked to that exposure."""
    client = server["client"]
    user = "13"
    answers = [client.post("/recommend", json={"user_id": user, "k": 5}).json() for _ in range(3)]
    ids = [a["request_id"] for a in answers]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    clicked = answers[-1]["items"][2]["item_id"]
    ack = client.post("/feedback", json={"user_id": user, "item_id": clicked, "event_type": "click",
                                         "request_id": ids[-1], "position": 3})
    assert ack.status_code == 200 and ack.json()["role"] == "positive"
    skip = client.post("/feedback", json={"user_id": user, "item_id": answers[-1]["items"][0]["item_id"],
                                          "event_type": "skip", "request_id": ids[-1], "position": 1}).json()
    assert skip["role"] == "negative"
    store = _exposures()
    wait_for(lambda: set(ids) <= set(store.read()[0]["request_id"]), timeout_s=10)
    exposures, items = store.read()
    mine = exposures.set_index("request_id").loc[ids[-1]]
    assert mine["user_id"] == user and mine["model_version"] == answers[-1]["model_version"]
    assert mine["variant"] == "champion" and len(mine["context"]) > 0
    shown = items[items["request_id"] == ids[-1]].sort_values("position")
    assert shown["item_id"].tolist() == [x["item_id"] for x in answers[-1]["items"]]
    assert shown["position"].tolist() == [1, 2, 3, 4, 5]
    linked = _log().linked()
    joined = linked.merge(items, on=["request_id", "item_id"], suffixes=("_event", "_shown"))
    assert {(r.event_type, r.position_shown) for r in joined[joined["request_id"] == ids[-1]].itertuples()} == {
        ("click", 3), ("skip", 1)}
    after = client.post("/recommend", json={"user_id": user, "k": 5}).json()
    assert skip and answers[-1]["items"][0]["item_id"] not in [x["item_id"] for x in after["items"]]
    store.close()


def test_similar_items_and_metadata_endpoints(server) -> None:
    client = server["client"]
    sim = client.post("/similar_items", json={"item_id": "50", "k": 5}).json()
    assert len(sim["items"]) == 5 and "50" not in [x["item_id"] for x in sim["items"]]
    assert client.post("/health").json()["status"] == "ok"
    ready = client.post("/ready").json()
    assert ready["ready"] is True and ready["event_log"] and ready["online_store"]
    assert ready["status"] == "ok" and ready["reason"] is None
    info = client.post("/model_info").json()
    assert info["version"] == server["version"] and info["n_items"] == 1682 and info["last_error"] is None


def test_post_items_stores_a_new_item_and_the_id_only_champion_says_it_waits_for_a_retrain(server) -> None:
    """``POST /items`` over HTTP (issue 18): stored in the shared catalogue, an upsert on a second call; this
    champion is ID-only, so it answers ``served_now`` false with the reason, and recommend never returns the item.
    (A text-aware model serving it at once: tests/integration/test_new_items.py.)"""
    from recloop.catalog import CatalogStore
    from serving.catalog import ID_ONLY_REASON

    client = server["client"]
    item = {"item_id": f"new-{uuid.uuid4().hex[:8]}", "title": "Star Trek: Nemesis (2002)", "genres": ["Sci-Fi"]}
    first = client.post("/items", json=item)
    assert first.status_code == 200, first.text[:500]
    body = first.json()
    assert body["inserted"] is True and body["known_item"] is False and body["served_now"] is False
    assert body["reason"] == ID_ONLY_REASON and body["n_catalogue"] >= 1
    again = client.post("/items", json={**item, "text": "The crew meets a clone of Picard."}).json()
    assert again["inserted"] is False and again["n_catalogue"] == body["n_catalogue"]
    row = {r["item_id"]: r for r in CatalogStore(get_settings().event_log_uri, create=False).list()}[item["item_id"]]
    assert row["text"] == "The crew meets a clone of Picard." and row["genres"] == ["Sci-Fi"]
    text = client.post("/model_info").json()["text"]
    assert text["serves_new_items"] is False and text["item_repr"] == "id" and text["reason"] == ID_ONLY_REASON
    answer = client.post("/recommend", json={"user_id": "1", "k": 50}).json()
    assert item["item_id"] not in [x["item_id"] for x in answer["items"]]


def test_simulated_users_over_http_every_reaction_acknowledged_and_linked(server) -> None:
    """``flows.simulate.HttpDriver``: 10 simulated ml-100k users, one session each, against the real service."""
    import time

    from flows.simulate import HttpDriver, lake_histories, round_metrics, sample_users
    from models.simulator import GroundTruth, SimConfig, UserSimulator

    policy = get_settings().event_policy
    events = server["events"]
    histories = lake_histories(events, policy)
    users = sample_users(list(histories), 10, seed=0)
    truth = GroundTruth.fit(policy.positives(events), kind="ease")
    # skip_below=1e9: every examined, unclicked slot is reported as a skip, so each slate sends feedback
    sim = UserSimulator(truth, {u: histories[u] for u in users}, SimConfig(k=10, seed=0, skip_below=1e9))
    with HttpDriver(server["base"]) as driver:
        t0 = time.perf_counter()
        results = [sim.run_session(u, driver.recommend, driver.feedback, session=0) for u in users]
        wall = time.perf_counter() - t0
        assert driver.errors == 0, driver.error_log
        acknowledged = list(driver.acknowledged)
        assert set(driver.versions) == {server["version"]}
    reactions = sum(r.clicks + r.skips for r in results)
    assert reactions > 0 and len(acknowledged) == reactions
    assert {a["role"] for a in acknowledged} <= {"positive", "negative"}
    log = _log()
    assert all(log.get(a["event_id"]) is not None for a in acknowledged)
    linked = {(r.request_id, int(r.position), r.item_id, r.event_type) for r in log.linked().itertuples()}
    assert {(a["request_id"], a["position"], a["item_id"], a["event_type"]) for a in acknowledged} <= linked
    shown_requests = {rid for r in results for rid in r.request_ids}
    assert {a["request_id"] for a in acknowledged} <= shown_requests
    log.close()
    popularity = policy.positives(events)["item_id"].astype(str).value_counts().to_dict()
    m = round_metrics(results, 10, len(truth.item_ids), popularity)
    assert m["sessions"] == 10 and m["slots"] == 10 * sum(r.slates for r in results)
    assert 0.0 <= m["ctr_at_k"] <= 1.0 and 0.0 <= m["skip_rate"] <= 1.0 and m["ctr_at_k"] + m["skip_rate"] <= 1.0
    assert m["clicks"] + m["skips"] >= sum(r.slates for r in results)  # position 1 is always examined
    assert 1.0 <= m["slates_per_session"] <= sim.config.max_slates and 0.0 < m["catalogue_share"] <= 1.0
    assert m["novelty"] > 0
    print(f"simulated users over HTTP: {len(results)} sessions, {m['slots']} slots, {reactions} feedback in "
          f"{wall:.2f} s = {len(results) / wall:.1f} sessions/s; CTR@10 {m['ctr_at_k']:.3f}, "
          f"skip rate {m['skip_rate']:.3f}")


def test_champion_swap_under_8_concurrent_clients_fails_no_request(server) -> None:
    """Runs last in the module: it moves the alias to a new version."""
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()
    lock = threading.Lock()

    def client_thread(c: int) -> None:
        with httpx.Client(base_url=server["base"], timeout=30) as http:
            j = 0
            while not stop.is_set():
                try:
                    r = http.post("/recommend", json={"user_id": str(1 + (c * 97 + j) % 943), "k": 10})
                    code = r.status_code
                    version = r.json().get("model_version") if code == 200 else None
                except httpx.HTTPError:
                    code, version = -1, None
                with lock:
                    statuses.append(code)
                    versions.add(version)
                j += 1

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    try:
        new_version = train_and_register(server["events"], server["items"], seed=1, seconds=4.0)
        for _ in range(120):
            if server["client"].post("/model_info").json()["version"] == new_version:
                break
            stop.wait(0.5)
        stop.wait(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert new_version != server["version"]
    assert server["client"].post("/model_info").json()["version"] == new_version
    assert len(statuses) > 100 and [s for s in statuses if s != 200] == []
    assert {server["version"], new_version} <= versions


def test_online_experiment_under_8_clients_routes_records_and_survives_a_champion_swap(server) -> None:
    """After the swap test (two versions exist): an A/B test and then an interleaving experiment, both
    pinned to the two versions, under 8 clients. Every worker picks up start/stop from the shared store
    within the poll interval; the arms (or teams) land in the exposures; a champion swap in the
    middle fails no request; after stop the champion serves alone."""
    from mlflow.tracking import MlflowClient

    from recloop.experiments import ExperimentStore, assign_arm
    from registry.aliases import get_alias_version, set_alias

    settings = get_settings()
    client = MlflowClient()
    champion = get_alias_version(client, settings.model_name, settings.model_alias)
    challenger = server["version"] if champion != server["version"] else "2"
    store = ExperimentStore(settings.event_log_uri)
    stop = threading.Event()
    answers: list[dict] = []
    failures: list[int] = []
    lock = threading.Lock()

    def client_thread(c: int) -> None:
        with httpx.Client(base_url=server["base"], timeout=30) as http:
            j = 0
            while not stop.is_set():
                r = http.post("/recommend", json={"user_id": str(1 + (c * 53 + j) % 943), "k": 6})
                with lock:
                    (answers.append(r.json()) if r.status_code == 200 else failures.append(r.status_code))
                j += 1

    def until(predicate, timeout_s: float = 20.0) -> None:
        wait_for(lambda: any(predicate(a) for a in answers[-16:]), timeout_s=timeout_s)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    try:
        ab = store.start(mode="ab", champion_version=champion, challenger_version=challenger)
        until(lambda a: a.get("experiment_id") == ab.experiment_id)
        set_alias(client, settings.model_name, settings.model_alias, challenger)  # a champion swap mid-experiment
        until(lambda a: a.get("experiment_id") == ab.experiment_id and a["arm"] == "challenger")
        stop.wait(2.0)
        store.stop()
        until(lambda a: a.get("experiment_id") is None)
        inter = store.start(mode="interleave", champion_version=champion, challenger_version=challenger)
        until(lambda a: a.get("experiment_id") == inter.experiment_id)
        stop.wait(2.0)
        store.stop()
        until(lambda a: a.get("experiment_id") is None)
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.close()
    assert failures == [] and len(answers) > 100
    in_ab = [a for a in answers if a.get("experiment_id") == ab.experiment_id]
    in_inter = [a for a in answers if a.get("experiment_id") == inter.experiment_id]
    assert in_ab and in_inter
    assert all(a["arm"] == "interleaved" and {x["team"] for x in a["items"]} <= {"champion", "challenger"}
               for a in in_inter)
    tail = answers[-8:]
    assert all(a.get("experiment_id") is None and a["model_version"] == challenger for a in tail)  # champion alone
    exposures = _exposures()
    wanted = {a["request_id"] for a in in_ab + in_inter}
    wait_for(lambda: wanted <= set(exposures.read()[0]["request_id"]), timeout_s=15)
    shown, items = exposures.read()
    rows = shown.set_index("request_id")
    for a in in_ab:  # the arm is the stored hash of the user; the arm's pinned version answered
        row = rows.loc[a["request_id"]]
        assert a["arm"] == row["arm"] == assign_arm(ab.salt, str(row["user_id"]), ab.weights)
        assert row["experiment_id"] == ab.experiment_id
        assert a["model_version"] == (champion if a["arm"] == "champion" else challenger)
    teams = items[items["request_id"].isin({a["request_id"] for a in in_inter})]
    assert set(teams["team"]) == {"champion", "challenger"}
    exposures.close()


def test_kill_9_under_load_loses_no_acknowledged_feedback(server) -> None:
    """Runs last (it kills the server): ``kill -9`` of the whole service during 8-client recommend +
    feedback load. Every acknowledged feedback is in the event log; the exposures lost are counted and
    stay within the stated bound (docs/operations.md): the answers of the last flush interval plus one
    batch in flight, measured here as the answers acknowledged in the last second before the kill."""
    import os
    import signal
    import time

    import psutil

    port = int(server["base"].rsplit(":", 1)[1])
    stop = threading.Event()
    acked_feedback: list[str] = []
    acked_answers: list[tuple[float, str]] = []
    lock = threading.Lock()

    def client_thread(c: int) -> None:
        with httpx.Client(base_url=server["base"], timeout=5) as http:
            j = 0
            while not stop.is_set():
                user = str(1 + (c * 131 + j) % 943)
                try:
                    ans = http.post("/recommend", json={"user_id": user, "k": 5})
                    if ans.status_code != 200:
                        continue
                    body = ans.json()
                    with lock:
                        acked_answers.append((time.monotonic(), body["request_id"]))
                    event_id = f"kill-{c}-{j}-{uuid.uuid4().hex[:6]}"
                    fb = http.post("/feedback", json={"user_id": user, "item_id": body["items"][1]["item_id"],
                                                      "event_type": "click", "event_id": event_id,
                                                      "request_id": body["request_id"], "position": 2})
                    if fb.status_code == 200:
                        with lock:
                            acked_feedback.append(event_id)
                except (httpx.HTTPError, ValueError):
                    pass  # the server died mid-request: not acknowledged
                j += 1

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    deadline = time.monotonic() + 60.0  # a loaded machine answers slower: kill once enough is acknowledged
    while time.monotonic() < deadline:
        with lock:
            if len(acked_feedback) > 50 and len(acked_answers) > 50:
                break
        time.sleep(0.2)
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
    groups = {os.getpgid(pid) for pid in pids}
    assert groups and os.getpgid(os.getpid()) not in groups, "the server's own process group was not found"
    killed_at = time.monotonic()
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    answers = {rid for at, rid in acked_answers if at <= killed_at}
    last_second = {rid for at, rid in acked_answers if killed_at - 1.0 <= at <= killed_at}
    assert len(acked_feedback) > 50 and len(answers) > 50
    log = _log()
    stored = {eid for eid in acked_feedback if log.get(eid) is not None}
    assert stored == set(acked_feedback)  # acknowledged feedback is never lost
    store = _exposures()
    written = set(store.read()[0]["request_id"])
    lost = answers - written
    print(f"kill -9: {len(answers)} answers acknowledged, {len(lost)} exposures lost, "
          f"{len(last_second)} answered in the last second; {len(acked_feedback)} feedback acknowledged, 0 lost")
    assert lost <= last_second  # only the answers of the last moments are lost
    store.close()


def test_rerank_explain_rules_and_the_blocklist_over_http(server) -> None:
    client = server["client"]
    plain = client.post("/recommend", json={"user_id": "1", "k": 10}).json()
    assert plain["reranker"] is None and all(x["because"] is None for x in plain["items"])
    for reranker in ("mmr", "dpp"):
        resp = client.post("/recommend", json={"user_id": "1", "k": 10, "diversity": 0.5, "reranker": reranker,
                                               "explain": True, "exclude_items": [plain["items"][0]["item_id"]]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        ids = [x["item_id"] for x in body["items"]]
        assert len(set(ids)) == 10 and plain["items"][0]["item_id"] not in ids
        assert body["reranker"].startswith(reranker)
        # the verb is the newest event's type: "rated" from ml-100k, or another after earlier tests' feedback
        verbs = tuple(f"Because you {v} " for v in {*VERBS.values(), DEFAULT_VERB})
        assert all(x["reason"].startswith(verbs) and 1 <= len(x["because"]) <= 3 for x in body["items"])
    # this home has no lake catalogue (items with genres): any genre is unknown; the filter itself is
    # covered in tests/unit/test_rerank_serving.py
    bad = client.post("/recommend", json={"user_id": "1", "genres": ["No-Such-Genre"]})
    assert bad.status_code == 400 and "genres" in bad.text
    cold = client.post("/recommend", json={"user_id": "never-seen-2", "k": 5, "explain": True}).json()
    assert all(0.0 <= x["score"] <= 1.0 and x["because"] is None for x in cold["items"])
    top = plain["items"][0]["item_id"]
    added = client.post("/blocklist", json={"action": "add", "item_ids": [top], "reason": "takedown"}).json()
    assert added["changed"] == [top] and top in {r["item_id"] for r in added["items"]}
    after = client.post("/recommend", json={"user_id": "1", "k": 10}).json()
    assert top not in [x["item_id"] for x in after["items"]]  # this worker re-reads at once
    removed = client.post("/blocklist", json={"action": "remove", "item_ids": [top]}).json()
    assert removed["changed"] == [top] and removed["items"] == []
