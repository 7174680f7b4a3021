"""Forget latency on a lake of 1,000,000 events: ``python -m bench.forget --json``.

Protocol (stated in the JSON): a synthetic lake (not a real dataset: ml-100k has 100k events) of ``--events``
rating events by ``--users`` users on ``--items`` items, user activity Zipf-like (a user's share ∝ 1/rank^0.8,
so the forgotten users below range from heavy to typical), written as ``--batches`` lake batches (every batch
holds events of most users, so a forget rewrites every batch file); the embedded stores of a fresh home: a
SQLite event log holding each forgotten user's 200 feedback events and 50 exposures (10 items each) plus 20,000
other users' events, the Feast offline source tables built from the lake (``features/*.parquet``), a quarantine
file with 100 rows. No Feast online store is materialised (its handler then finds no file: its cost, one
keyed delete per view, is in ``tests/integration/test_forget_e2e.py``'s run). Each of ``--forgets`` users
(ranks 1, 10, 100, ... by activity) is forgotten with ``recloop.forget.run_forget`` over every kernel handler
and the online-store handler; reported: per forget the wall time of the handler passes (tombstone, first pass,
second pass, verification, SQLite checkpoint, receipt) with ``settle_s = 0`` (the configured pause,
``settings.forget_settle_s``, default 1 s, adds to it) and the time per store; the median and max over forgets.
Seed ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("bench.forget")


def synthetic_events(n_events: int, n_users: int, n_items: int, seed: int) -> pd.DataFrame:
    """Rating events (contract columns, raw): users Zipf-like (share ∝ 1/rank^0.8), items uniform."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_users + 1) ** 0.8
    users = rng.choice(n_users, size=n_events, p=weights / weights.sum())
    ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.sort(rng.integers(0, 365 * 86400, n_events)),
                                                                  unit="s")
    return pd.DataFrame({"user_id": np.char.add("user-", users.astype(str)),
                         "item_id": np.char.add("item-", rng.integers(0, n_items, n_events).astype(str)),
                         "event_type": "rating", "value": rng.integers(1, 6, n_events).astype(float),
                         "timestamp": ts, "source": "synthetic-forget"})


def build_home(home: Path, args: argparse.Namespace) -> tuple[Any, list[str], dict[str, Any]]:
    """Fill ``home``; returns (settings, the users to forget, counts)."""
    os.environ["RECLOOP_HOME"] = str(home)
    from featurestore.materialize import build_feature_tables, write_feature_tables
    from recloop.contract import coerce_events, coerce_items, coerce_users
    from recloop.eventlog import EventLog
    from recloop.exposures import ExposureLog
    from recloop.lake import Lake
    from recloop.settings import get_settings
    from recloop.sources import SourceFrames

    get_settings.cache_clear()
    settings = get_settings()
    raw = synthetic_events(args.events, args.users, args.items, args.seed)
    events = coerce_events(raw, default_source="synthetic-forget")
    lake = Lake(settings.lake_path)
    empty_items = coerce_items(pd.DataFrame({"item_id": pd.Series(dtype=object), "title": pd.Series(dtype=object)}))
    for k, part in enumerate(np.array_split(np.arange(len(events)), args.batches)):
        users = coerce_users(pd.DataFrame({"user_id": events["user_id"].iloc[part].unique()}))
        lake.ingest(SourceFrames(events=events.iloc[part].reset_index(drop=True), items=empty_items, users=users,
                                 meta={}), batch_id=f"b{k:03d}")
        print(f"lake batch {k + 1}/{args.batches}", file=sys.stderr)
    ranks = [r for r in (1, 10, 100, 1000, 10000) if r <= args.users][: args.forgets]
    targets = [f"user-{r - 1}" for r in ranks]
    log = EventLog(settings.event_log_uri)
    others = raw.sample(n=min(20_000, len(raw)), random_state=args.seed)
    log.append(others[~others["user_id"].isin(targets)])
    exposures = ExposureLog(settings.event_log_uri)
    now = pd.Timestamp.now(tz="UTC")
    for user in targets:
        log.append([{"user_id": user, "item_id": f"item-{i}", "event_type": "click", "timestamp": now}
                    for i in range(200)])
        for j in range(50):
            exposures.record(f"{user}-{j}", user, "1", [(f"item-{i}", 1.0) for i in range(10)])
    exposures.close()
    log.close()
    tables = build_feature_tables(events, None, n=settings.max_seq_len, created_ts=now.to_pydatetime(),
                                  as_of=now.to_pydatetime(), encoder=None, policy=settings.event_policy)
    write_feature_tables(tables, settings.home / "features")
    quarantine = settings.home / "quarantine" / "b000"
    quarantine.mkdir(parents=True)
    raw.head(100).astype(str).to_parquet(quarantine / "quarantined.parquet")
    per_user = events["user_id"].value_counts()
    return settings, targets, {"lake_events": len(events), "lake_events_of_forgotten": {
        u: int(per_user.get(u, 0)) for u in targets}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the home and time ``--forgets`` forgets."""
    from featurestore.forget import OnlineStoreHandler
    from recloop.forget import run_forget
    from recloop.forget_handlers import close_handlers, kernel_handlers

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        settings, targets, counts = build_home(Path(tmp) / "home", args)
        setup_s = time.perf_counter() - t0
        forgets = []
        for user in targets:
            handlers = [*kernel_handlers(settings), OnlineStoreHandler(settings)]
            t = time.perf_counter()
            try:
                result = run_forget(user, settings, handlers, settle_s=0.0)
            finally:
                close_handlers(handlers)
            wall = time.perf_counter() - t
            forgets.append({"lake_events_of_user": counts["lake_events_of_forgotten"][user], "wall_s": round(wall, 3),
                            "rows": result.rows, "seconds": result.seconds})
            print(f"forgot a user with {forgets[-1]['lake_events_of_user']} lake events in {wall:.2f} s",
                  file=sys.stderr)
    walls = [f["wall_s"] for f in forgets]
    return {
        "benchmark": "forget",
        "protocol": {
            "data": "synthetic lake (not a real dataset): rating events, users Zipf-like (share ∝ 1/rank^0.8), "
                    "items uniform, one year of timestamps; each forgotten user also has 200 event-log rows and "
                    "50 exposures; Feast offline tables built from the lake; 100 quarantined rows; no online file",
            "forgotten_users": "ranks 1, 10, 100, ... by activity",
            "events": args.events, "users": args.users, "items": args.items, "batches": args.batches,
            "seed": args.seed, "settle_s": 0.0,
            "measured": "run_forget over every kernel handler + the online-store handler (no online file): "
                        "tombstone, two passes, verification, SQLite checkpoint, receipt; settle pause excluded",
            "machine": f"{os.cpu_count()} cores (shared)",
        },
        "setup_s": round(setup_s, 1),
        "forget_wall_s": {"median": float(np.median(walls)), "max": float(max(walls))},
        "forgets": forgets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--forgets", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="One JSON document on stdout (the only output)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    from recloop.settings import configure_environment

    configure_environment()
    out = run(args)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
