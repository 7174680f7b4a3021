"""``recloop bench features``: feature-store figures on ml-100k, as JSON.

Measures, per online store (SQLite, Redis): feature-table build, apply, materialisation and
1,000 single-user online reads (p50/p99); once: loading the packaged sentence encoder and
embedding the ml-100k catalogue. Each store lives in a temporary home with its own Feast project
(so its own Redis keys) and is torn down afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def _percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "n": int(arr.size),
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "mean_ms": round(float(arr.mean()), 4),
    }


def _bench_backend(
    backend: str, events: Any, content: Any, n_reads: int, seed: int, feast_engine: bool
) -> dict:
    from featurestore import materialize as FF
    from featurestore.online import OnlineFeatures, open_feature_store, time_reads
    from recloop import features as F
    from recloop.settings import Settings

    home = Path(tempfile.mkdtemp(prefix=f"recloop-bench-{backend}-"))
    settings = Settings(home=home, online_store=backend, feast_project=f"bench_{uuid.uuid4().hex[:8]}")
    out: dict[str, Any] = {"online_store": backend}
    store = open_feature_store(settings)
    try:
        now = datetime.now(UTC)
        t0 = time.perf_counter()
        tables = FF.build_feature_tables(
            events,
            None,
            n=settings.max_seq_len,
            created_ts=now,
            as_of=events["timestamp"].max(),
            encoder=None,
        )
        tables["item_content"] = content
        FF.write_feature_tables(tables, home / "features")
        out["tables_s"] = round(time.perf_counter() - t0, 3)
        out["table_rows"] = {k: len(v) for k, v in tables.items()}
        t0 = time.perf_counter()
        FF.apply_repo(store, FF.feature_repo_dir(settings))
        out["apply_s"] = round(time.perf_counter() - t0, 3)
        data_max = F.feature_tables_max_ts([tables[v] for v in FF.EVENT_VIEWS], not_after=now).to_pydatetime()
        t0 = time.perf_counter()
        FF.materialize_incremental(store, home / "features", data_max, now, engine="direct")
        out["materialize_direct_s"] = round(time.perf_counter() - t0, 3)
        if feast_engine:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Feast prints progress; stdout is the JSON
                store.materialize(FF.CONTENT_EPOCH, now, feature_views=list(FF.SOURCE_FILES))
            out["materialize_feast_s"] = round(time.perf_counter() - t0, 3)
        online = OnlineFeatures(store, settings=settings, freshness_s=math.inf)
        users = sorted(events["user_id"].unique())
        rng = random.Random(seed)
        sample = [rng.choice(users) for _ in range(n_reads)]
        time_reads(online, sample[:50])  # warm-up: registry cache, connections
        out["online_read_recent_items"] = _percentiles(time_reads(online, sample))
        t0 = time.perf_counter()
        for uid in sample[:100]:
            online.push_recent_items(uid, ["1", "2", "3"], now)
        out["push_mean_ms"] = round((time.perf_counter() - t0) * 1000 / 100, 3)
    finally:
        store.teardown()
        shutil.rmtree(home, ignore_errors=True)
    return out


def run_feature_benchmark(
    ml100k_path: Path | None,
    backends: tuple[str, ...] = ("sqlite", "redis"),
    *,
    n_reads: int = 1000,
    seed: int = 42,
    feast_engine: bool = False,
) -> dict[str, Any]:
    """Run the benchmark and return the figures (see module docstring).

    Args:
        ml100k_path: folder with ml-100k's ``u.data``/``u.item`` (None: ``load_source`` default).
        backends: online stores to measure, each ``"sqlite"`` or ``"redis"``.
        n_reads: single-user online reads per store.
        feast_engine: also time Feast's own ``materialize`` (dask engine; ~15 s on ml-100k).
    Raises:
        ValueError: an unknown backend.
    """
    from featurestore import materialize as FF
    from recloop import features as F
    from recloop.sources import load_source

    bad = [b for b in backends if b not in ("sqlite", "redis")]
    if bad:
        raise ValueError(f"unknown online store(s) {bad}; expected 'sqlite' or 'redis'")
    frames = load_source("movielens-100k", ml100k_path)
    result: dict[str, Any] = {
        "dataset": "movielens-100k",
        "n_events": len(frames.events),
        "n_items": len(frames.items),
        "n_users": int(frames.events["user_id"].nunique()),
    }
    t0 = time.perf_counter()
    encoder = FF.load_text_encoder()
    result["encoder_load_s"] = round(time.perf_counter() - t0, 3)
    items = frames.items.assign(created_at=frames.items["created_at"].fillna(pd.Timestamp(FF.CONTENT_EPOCH)))
    t0 = time.perf_counter()
    content = F.item_content_table(items, encoder, datetime.now(UTC))
    result["embed_catalogue_s"] = round(time.perf_counter() - t0, 3)
    result["embedding_dim"] = len(content["embedding"].iloc[0])
    result["stores"] = [
        _bench_backend(b, frames.events, content, n_reads, seed, feast_engine) for b in backends
    ]
    return result
