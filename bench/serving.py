"""Serving set-up and benchmark: an ml-100k champion, features and a real ``bentoml serve``.

``recloop bench serving`` prints JSON, with the exposure log on (the default): per concurrency (1, 8, 32)
p50/p99, req/s and errors of recommend-only calls, of an 80/20 recommend/feedback mix and of a no-op
``GET /livez`` (this client's, server's and machine's ceiling, same run); feedback p50/p99 and the share
of recommends right after a feedback that reflect it; optionally (``--soak-s``) a soak watching the
resident memory of the service's process tree.
The same set-up (``prepare_home``, ``running_server``) backs ``tests/integration/test_serving_http.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tenacity import RetryError, Retrying, retry_if_exception_type, retry_if_result, stop_after_delay, wait_fixed

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serving_env(home: Path, **extra: str) -> dict[str, str]:
    """``RECLOOP_*`` variables of an isolated serving home (MovieLens rows are decades old, so the
    online freshness limit is lifted)."""
    env = {
        "RECLOOP_HOME": str(home),
        "RECLOOP_SERVE_POLL_INTERVAL_S": "1",
        "RECLOOP_MAX_SEQ_LEN": "50",
        "RECLOOP_ONLINE_STORE": "sqlite",
        "RECLOOP_ONLINE_FRESHNESS_S": "1e12",
    }
    env.update(extra)
    return env


def train_and_register(events: Any, items: Any, seed: int = 0, seconds: float = 12.0) -> str:
    """Train a short SASRec on ``events``, log it to MLflow (current settings), set the alias.

    Returns:
        The new registered version (str).
    """
    import mlflow

    from models.checkpoint import save_checkpoint
    from models.sasrec import SASRecConfig
    from models.sequences import build_sequences, leave_one_out
    from models.trainer import TrainConfig, train_model
    from models.vocab import ItemVocabulary
    from recloop.settings import get_settings
    from registry.aliases import set_alias
    from registry.store import log_model
    from registry.tracking import configure_tracking, ensure_experiment

    settings = get_settings()
    events = settings.event_policy.positives(events)  # histories and targets: positives only
    vocab = ItemVocabulary.from_ids(events["item_id"].astype(str))
    split = leave_one_out(build_sequences(events, vocab))
    cfg = SASRecConfig(n_items=len(vocab), max_seq_len=settings.max_seq_len, d_model=32, n_heads=1,
                       n_layers=1, dropout=0.2)
    result = train_model(split, vocab, cfg, TrainConfig(epochs=50, patience=50, seed=seed, device="cpu",
                                                         max_train_seconds=seconds), progress=False)
    titles = dict(zip(items["item_id"].astype(str), items["title"].astype(str), strict=True))
    counts = events["item_id"].astype(str).value_counts()
    extra = {"titles": titles, "item_popularity": {str(k): int(v) for k, v in counts.items()}, "seed": seed}
    ckpt = save_checkpoint(settings.home / f"ckpt-{seed}.pt", result.model.cpu(), vocab, extra)
    client = configure_tracking(settings)
    with mlflow.start_run(experiment_id=ensure_experiment(client, settings=settings)):
        info = log_model(ckpt, registered_model_name=settings.model_name)
    version = str(info.registered_model_version)
    set_alias(client, settings.model_name, settings.model_alias, version)
    return version


def materialize_features(events: Any) -> int:
    """Feature tables of ``events`` -> Feast apply -> materialise into the online store. Returns users."""
    from featurestore.materialize import apply_repo, build_feature_tables, feature_repo_dir, write_feature_tables
    from featurestore.online import open_feature_store
    from recloop.settings import get_settings

    settings = get_settings()
    now = datetime.now(UTC)
    tables = build_feature_tables(events, None, n=settings.max_seq_len, created_ts=now,
                                  as_of=events["timestamp"].max().to_pydatetime(), encoder=None,
                                  policy=settings.event_policy)
    write_feature_tables(tables, settings.home / "features")
    store = open_feature_store(settings)
    apply_repo(store, feature_repo_dir(settings))
    store.materialize(datetime(1970, 1, 1, tzinfo=UTC), now, feature_views=list(tables))
    return int(events["user_id"].nunique())


def prepare_home(ml100k: Path, seconds: float = 12.0) -> dict[str, Any]:
    """Fill the current ``RECLOOP_HOME``: champion v1, event log seeded with ml-100k, online features."""
    from recloop.eventlog import EventLog
    from recloop.settings import get_settings
    from recloop.sources import load_source

    frames = load_source("movielens-100k", ml100k)
    version = train_and_register(frames.events, frames.items, seed=0, seconds=seconds)
    log = EventLog(get_settings().event_log_uri)
    log.append(frames.events)
    log.close()
    n_users = materialize_features(frames.events)
    return {"version": version, "n_users": n_users, "events": frames.events, "items": frames.items}


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log_path: Path, ready_s: float) -> None:
    """Poll ``base/readyz`` every 0.5 s until it answers 200.

    Raises:
        RuntimeError: the server exited; TimeoutError: not ready within ``ready_s`` (both give the log tail).
    """

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"bentoml serve exited rc={proc.returncode}; log tail:\n{tail}")
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200

    poll = Retrying(stop=stop_after_delay(ready_s), wait=wait_fixed(0.5),
                    retry=retry_if_exception_type(httpx.HTTPError) | retry_if_result(lambda ok: not ok))
    try:
        poll(ready)
    except RetryError:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise TimeoutError(f"server not ready after {ready_s}s; log tail:\n{tail}") from None


class ServerUrl(str):
    """The base URL of a running server (a plain str), with ``pid``: the server process."""

    pid: int

    def __new__(cls, url: str, pid: int) -> ServerUrl:
        obj = super().__new__(cls, url)
        obj.pid = pid
        return obj


@contextmanager
def running_server(env: dict[str, str], port: int, log_path: Path, ready_s: float = 180.0) -> Iterator[Any]:
    """Run ``bentoml serve serving.service:Recommender`` on 127.0.0.1:``port`` for the block.

    Yields:
        The base URL, once ``/readyz`` answers 200 (a ``ServerUrl``: a str that also has ``.pid``, the
        server process, whose tree holds the workers).
    Raises:
        RuntimeError: the server exited; TimeoutError: not ready within ``ready_s``.
    """
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    argv = [bentoml, "serve", "serving.service:Recommender", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, base, log_path, ready_s)
            yield ServerUrl(base, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _pcts(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms) if ms else np.zeros(1)
    p50, p99 = (round(float(np.percentile(arr, q)), 2) for q in (50, 99))
    return {"p50_ms": p50, "p99_ms": p99}


def load_test(
    base: str, user_ids: list[str], n_requests: int, concurrency: int, k: int = 10, *, feedback_share: float = 0.0,
    items: list[str] | None = None, noop: bool = False, seed: int = 0,
) -> dict[str, Any]:
    """``n_requests`` calls from ``concurrency`` threads (one keep-alive client each), closed loop.

    Args:
        feedback_share: share of the calls that are a ``feedback`` click (on ``items``, seeded), the rest
            ``recommend`` (0.2: the 80/20 mix).
        noop: ``GET /livez`` instead (no model, no store: the ceiling of this client, server and machine).
    Returns:
        {concurrency, requests, p50_ms, p99_ms, req_per_s, errors, [recommend/feedback p50/p99 for a mix]}.
    """
    lat: list[float] = []
    by_kind: dict[str, list[float]] = {"recommend": [], "feedback": []}
    errors = [0]
    lock = threading.Lock()
    per_thread = n_requests // concurrency
    pool = items or []

    def worker(offset: int) -> None:
        rng = np.random.default_rng((seed, offset))
        with httpx.Client(base_url=base, timeout=10) as client:
            for j in range(per_thread):
                uid = user_ids[(offset * per_thread + j) % len(user_ids)]
                kind = "feedback" if pool and rng.random() < feedback_share else "recommend"
                t0 = time.perf_counter()
                try:
                    if noop:
                        ok = client.get("/livez").status_code == 200
                    elif kind == "feedback":
                        item = pool[int(rng.integers(len(pool)))]
                        ok = client.post("/feedback", json={"user_id": uid, "item_id": item,
                                                            "event_type": "click"}).status_code == 200
                    else:
                        ok = client.post("/recommend", json={"user_id": uid, "k": k}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(dt)
                    by_kind[kind].append(dt)
                    errors[0] += not ok

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {"concurrency": concurrency, "requests": len(lat), **_pcts(lat),
           "req_per_s": round(len(lat) / wall, 1), "errors": errors[0]}
    if feedback_share > 0 and not noop:
        out.update({f"{kind}_{key}": v for kind, ms in by_kind.items() for key, v in _pcts(ms).items()})
    return out


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of process ``pid`` and all its descendants (psutil), as one figure."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 2**20, 1)


def soak(base: str, pid: int, user_ids: list[str], items: list[str], *, seconds: float, concurrency: int = 8,
         warmup_s: float = 10.0) -> dict[str, Any]:
    """A closed-loop 80/20 load for ``warmup_s`` then ``seconds``; the service tree's RSS after the warm-up,
    every 5 s, and at the end (growth = end / after warm-up − 1; goal ≤ 10%)."""
    stop = threading.Event()
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()

    def worker(offset: int) -> None:
        rng = np.random.default_rng((1, offset))
        with httpx.Client(base_url=base, timeout=10) as client:
            j = 0
            while not stop.is_set():
                uid = user_ids[(offset * 7919 + j) % len(user_ids)]
                j += 1
                try:
                    if rng.random() < 0.2:
                        r = client.post("/feedback", json={"user_id": uid, "item_id": items[int(rng.integers(
                            len(items)))], "event_type": "click"})
                    else:
                        r = client.post("/recommend", json={"user_id": uid, "k": 10})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts["requests"] += 1
                    counts["errors"] += not ok

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    samples = [process_tree_rss_mb(pid)]
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        time.sleep(min(5.0, max(0.0, t_end - time.monotonic())))
        samples.append(process_tree_rss_mb(pid))
    stop.set()
    for t in threads:
        t.join(timeout=15)
    growth = samples[-1] / samples[0] - 1 if samples[0] else None
    return {"seconds": seconds, "warmup_s": warmup_s, "concurrency": concurrency, "mix": "80% recommend / 20% feedback",
            **counts, "rss_mb_after_warmup": samples[0], "rss_mb_end": samples[-1], "rss_mb_max": max(samples),
            "rss_growth": round(growth, 4) if growth is not None else None, "goal_rss_growth": 0.10}


def feedback_test(base: str, user_ids: list[str], n: int) -> dict[str, Any]:
    """Feedback latency, and whether the recommend right after each feedback reflects it
    (the item is excluded and the scores changed)."""
    lat: list[float] = []
    reflected = 0
    with httpx.Client(base_url=base, timeout=10) as client:
        for j in range(n):
            uid = user_ids[j % len(user_ids)]
            before = client.post("/recommend", json={"user_id": uid, "k": 10}).json()
            item = before["items"][0]["item_id"]
            t0 = time.perf_counter()
            r = client.post("/feedback", json={"user_id": uid, "item_id": item, "event_type": "click",
                                               "event_id": uuid.uuid4().hex})
            lat.append((time.perf_counter() - t0) * 1000)
            after = client.post("/recommend", json={"user_id": uid, "k": 10}).json()
            ids = [x["item_id"] for x in after["items"]]
            changed = [x["score"] for x in after["items"]] != [x["score"] for x in before["items"]]
            reflected += r.status_code == 200 and item not in ids and changed
    return {"feedback": {"requests": n, **_pcts(lat)}, "reflected_share": round(reflected / max(n, 1), 4)}


def bench_serving(ml100k: Path, home: Path, n_requests: int = 2000, n_feedback: int = 200, *,
                  concurrencies: tuple[int, ...] = (1, 8, 32), workers: int | None = None,
                  soak_s: float = 0.0) -> dict[str, Any]:
    """Prepare ``home``, start the server and measure (see module docstring).

    Args:
        n_requests: calls per (load, concurrency) cell (a quarter at concurrency 1).
        n_feedback: feedback -> recommend rounds of the read-your-writes check.
        concurrencies: closed-loop client threads per cell.
        workers: BentoML worker processes (``RECLOOP_SERVE_WORKERS``; None: the settings' default).
        soak_s: > 0: then a soak of that many seconds (80/20 at concurrency 8) watching the service's RSS.
    """
    from recloop.settings import configure_environment, get_settings

    configure_environment()
    env = serving_env(home, **({"RECLOOP_SERVE_WORKERS": str(workers)} if workers else {}))
    os.environ.update(env)
    get_settings.cache_clear()
    t0 = time.perf_counter()
    prep = prepare_home(ml100k)
    users = sorted(prep["events"]["user_id"].astype(str).unique())
    items = sorted(prep["events"]["item_id"].astype(str).unique())
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cells: dict[str, dict[str, Any]] = {"noop": {}, "recommend": {}, "mix_80_20": {}}
    with running_server(env, free_port(), home / "serve.log") as base:
        start_s = time.perf_counter() - t0
        warm = load_test(base, users, 200, 4)  # warm-up
        for c in concurrencies:
            n = n_requests // 4 if c == 1 else n_requests
            cells["noop"][f"c{c}"] = load_test(base, users, n, c, noop=True)
            cells["recommend"][f"c{c}"] = load_test(base, users, n, c)
            cells["mix_80_20"][f"c{c}"] = load_test(base, users[::-1], n, c, feedback_share=0.2, items=items)
        fb = feedback_test(base, users[::-1], n_feedback)
        soaked = soak(base, base.pid, users, items, seconds=soak_s) if soak_s > 0 else None
    goals = {"c1_p50_ms": 3, "c1_p99_ms": 8, "c8_req_per_s": 400, "c8_p99_ms": 40, "reflected_share": 1.0}
    answers = sum(r["requests"] - r["errors"] for r in [warm, *cells["recommend"].values()]) + 2 * n_feedback
    answers += sum(round(r["requests"] * 0.8) for r in cells["mix_80_20"].values())  # about: the mix is seeded
    settings = get_settings()
    protocol = {"data": "ml-100k", "event_policy": settings.event_policy.describe(), "calls_per_cell": n_requests,
                "calls_c1": n_requests // 4, "feedback_rounds": n_feedback, "workers": settings.effective_serve_workers,
                "client": "httpx threads on the same machine (shares its cores with the server)",
                "noop": "GET /livez: the ceiling of this client, server and machine"}
    c8 = cells["recommend"].get("c8", {})
    return {"protocol": protocol, "model_version": prep["version"], "prepare_s": round(prep_s, 1),
            "server_start_s": round(start_s, 1), **cells, "recommend_c1": cells["recommend"].get("c1"),
            "recommend_c8": c8, **fb, "soak": soaked, "exposure_log": _exposure_counts(answers), "goals": goals,
            "c8_share_of_noop_ceiling": round(c8["req_per_s"] / cells["noop"]["c8"]["req_per_s"], 3)
            if c8 and cells["noop"].get("c8") else None}


def _exposure_counts(answers: int) -> dict[str, Any]:
    """Whether the exposure log was on and how many of the ``answers`` it holds after the server stopped
    (a graceful stop writes the queue: every answer should be there)."""
    from recloop.exposures import ExposureLog
    from recloop.settings import get_settings

    settings = get_settings()
    if not settings.exposure_log:
        return {"enabled": False}
    store = ExposureLog(settings.event_log_uri)
    try:
        written = store.count()
    finally:
        store.close()
    return {"enabled": True, "flush_ms": settings.exposure_flush_ms, "answers": answers, "written": written}
