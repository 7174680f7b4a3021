"""What one loop turn costs as the lake grows: 1,000 new events on lakes of 100,000 and 1,000,000 events.

Times the data stages of ``flows/loop.py`` as they run today, in-process and without Prefect/MLflow, each on
the code the flow calls: read the new events past the cursor (``recloop.cursor.read_new``), validate them
(``recloop.contract.coerce_events``) and append them to the lake (``Lake.ingest``), rebuild the feature tables
(``featurestore.materialize.build_feature_tables`` over ``Lake.events()``, as ``flows/features`` does; the
Feast apply/materialisation is not timed), build the training set (``flows.train.prepare_split`` and
``data_fingerprint`` over the whole lake, as ``flows/train`` does). Training and evaluation are not timed:
their cost per epoch is proportional to the users of the training set (reported), which today is every
user of the lake.

Data: the synthetic source (``recloop.sources.synthetic``, seeded), users scaled with the lake (one user
per 50 events); the new events are 1,000 more from the same generator (another seed, 250 of the lake's users). Run::

    python -m bench.loop_turn --json            # one JSON document on stdout, progress on stderr

Modes (``--mode``): ``before`` is the measurement above (the turn as it was: everything from the whole lake);
``after`` (default) times the incremental turn (``flows/loop_incremental.py``): read, validate, lake ingest
(dedupe against colliding ids only), features from the new lake batches (``featurestore.incremental.
update_features``: touched users' history, the trailing item window, one new part per view; the online write
goes to a recording stub, its rows counted), the training set (lake users, the seeded replay sample, the
sample's histories by user, ``prepare_split`` warm on the champion's vocabulary), the fingerprint (the lake's
chained one + the training set's), a fixed training budget (one warm-started epoch on CPU from a champion
trained, untimed, on a replay-sized sample) and the evaluation (``loop_eval_users`` seeded users: candidate,
champion and every baseline, full ranking). The full feature build that gives the increment its state is set-up,
not timed. ``--items`` fixes the catalogue (default 2,000 for both lakes: a lake grows in events and users, and
full-ranking/EASE costs follow the catalogue, not the lake); ``--items 0`` scales it as before (events / 200).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SIZES = (100_000, 1_000_000)
NEW_EVENTS = 1_000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _items(n_lake: int, items: int) -> int:
    return items if items > 0 else max(500, n_lake // 200)


def one_turn(n_lake: int, seed: int, workdir: Path, items: int = 0) -> dict[str, Any]:
    """Stage times (s) of one turn as it was (``before``) with ``NEW_EVENTS`` new events on a lake of ``n_lake``."""
    import pandas as pd

    from featurestore.materialize import build_feature_tables
    from flows.train import data_fingerprint, prepare_split
    from recloop.contract import coerce_events
    from recloop.cursor import LogCursor, read_new
    from recloop.eventlog import EventLog
    from recloop.lake import Lake
    from recloop.policy import EventPolicy
    from recloop.sources import load_source
    from recloop.sources.base import SourceFrames

    n_users = max(1000, n_lake // 50)
    frames = load_source("synthetic", seed=seed, n_events=n_lake, n_users=n_users, n_items=_items(n_lake, items))
    lake = Lake(workdir / f"lake-{n_lake}")
    lake.ingest(frames)
    new = load_source("synthetic", seed=seed + 1, n_events=NEW_EVENTS, n_users=NEW_EVENTS // 4,
                      n_items=_items(n_lake, items)).events
    new = new.assign(event_id=[f"new-{i}" for i in range(len(new))],
                     timestamp=pd.Timestamp.now(tz="UTC") - pd.to_timedelta(range(len(new), 0, -1), unit="s"))
    log = EventLog(f"sqlite:///{workdir / f'log-{n_lake}.db'}")
    log.append(new)
    policy = EventPolicy()
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    rows, _ = read_new(log, LogCursor(), datetime.now(UTC))
    times["read_new_events"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = coerce_events(rows.drop(columns=["seq", "ingested_at"]), default_source="feedback")
    times["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lake.ingest(SourceFrames(events=batch))
    times["lake_ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    events = lake.events()
    times["lake_read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    now = datetime.now(UTC)
    build_feature_tables(events, None, n=50, created_ts=now, as_of=now, encoder=None, policy=policy)
    times["feature_tables"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, split = prepare_split(events, policy=policy)
    times["training_set"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data_fingerprint(events, "lake")
    times["fingerprint"] = time.perf_counter() - t0
    log.close()
    total = sum(times.values())
    return {"n_lake": n_lake, "new_events": len(batch), "stages_s": times, "total_s": total,
            "training_users": int(len(split.train)) if hasattr(split.train, "__len__") else None,
            "lake_users": int(events["user_id"].nunique())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args(argv)
    from recloop.settings import configure_environment

    configure_environment()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            _log(f"loop turn on a lake of {n:,} events ...")
            results.append(one_turn(n, args.seed, Path(tmp)))
            _log(json.dumps(results[-1]))
    ratio = results[-1]["total_s"] / results[0]["total_s"] if len(results) > 1 else None
    doc = {"benchmark": "loop_turn", "protocol": {
        "data": "synthetic source (seeded), one user per 50 events, items = events / 200", "seed": args.seed,
        "new_events": NEW_EVENTS, "timed": "read past the cursor, validate, lake ingest, lake read, feature tables "
        "(no Feast apply/materialise), training set (prepare_split) and fingerprint; not training/evaluation",
        "machine": "in-process, CPU"}, "results": results, "cost_ratio_last_over_first": ratio}
    out = json.dumps(doc, indent=None if args.json else 2)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
