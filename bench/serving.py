"""Serving set-up and benchmark: an ml-100k champion, features and a real ``bentoml serve``.

``recloop bench serving`` prints JSON: recommend p50/p99 and req/s at concurrency 1 and 8,
errors, feedback p50/p99, and the share of recommends right after a feedback that reflect it.
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


@contextmanager
def running_server(env: dict[str, str], port: int, log_path: Path, ready_s: float = 180.0) -> Iterator[str]:
    """Run ``bentoml serve serving.service:Recommender`` on 127.0.0.1:``port`` for the block.

    Yields:
        The base URL, once ``/readyz`` answers 200.
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
            yield base
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
    base: str, user_ids: list[str], n_requests: int, concurrency: int, k: int = 10
) -> dict[str, Any]:
    """``n_requests`` recommends from ``concurrency`` threads (one keep-alive client each)."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per_thread = n_requests // concurrency

    def worker(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            for j in range(per_thread):
                uid = user_ids[(offset * per_thread + j) % len(user_ids)]
                t0 = time.perf_counter()
                try:
                    ok = client.post("/recommend", json={"user_id": uid, "k": k}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(dt)
                    errors[0] += not ok

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat), **_pcts(lat),
            "req_per_s": round(len(lat) / wall, 1), "errors": errors[0]}


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


def bench_serving(ml100k: Path, home: Path, n_requests: int = 2000, n_feedback: int = 200) -> dict[str, Any]:
    """Prepare ``home``, start the server and measure (see module docstring)."""
    from recloop.settings import configure_environment, get_settings

    configure_environment()
    env = serving_env(home)
    os.environ.update(env)
    get_settings.cache_clear()
    t0 = time.perf_counter()
    prep = prepare_home(ml100k)
    users = sorted(prep["events"]["user_id"].astype(str).unique())
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with running_server(env, free_port(), home / "serve.log") as base:
        start_s = time.perf_counter() - t0
        warm = load_test(base, users, 200, 4)  # warm-up
        c1 = load_test(base, users, n_requests // 4, 1)
        c8 = load_test(base, users, n_requests, 8)
        fb = feedback_test(base, users[::-1], n_feedback)
    goals = {"c1_p50_ms": 3, "c1_p99_ms": 8, "c8_req_per_s": 400, "c8_p99_ms": 40, "reflected_share": 1.0}
    answers = sum(r["requests"] - r["errors"] for r in (warm, c1, c8)) + 2 * n_feedback
    protocol = {"data": "ml-100k", "event_policy": get_settings().event_policy.describe(),
                "recommends_c8": n_requests, "recommends_c1": n_requests // 4, "feedback_rounds": n_feedback}
    return {"protocol": protocol, "model_version": prep["version"], "prepare_s": round(prep_s, 1),
            "server_start_s": round(start_s, 1), "recommend_c1": c1, "recommend_c8": c8, **fb,
            "exposure_log": _exposure_counts(answers), "goals": goals}


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
