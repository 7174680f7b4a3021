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


class _RecordingStore:
    """Stands for the Feast store: counts the rows an incremental turn writes online (not timed)."""

    def __init__(self) -> None:
        self.rows = 0

    def write_to_online_store(self, view: str, df: Any) -> None:
        self.rows += len(df)


def incremental_turn(n_lake: int, seed: int, workdir: Path, items: int, replay: int, eval_users: int,
                     epochs: int) -> dict[str, Any]:
    """Stage times (s) of one incremental turn (``flows/loop_incremental.py``) with ``NEW_EVENTS`` new events."""
    import pandas as pd

    from featurestore.incremental import full_state, update_features, write_state
    from featurestore.materialize import build_feature_tables, write_feature_tables
    from flows.evaluate import evaluate_all, sample_split
    from flows.train import data_fingerprint, prepare_split
    from models.baselines import BASELINES, baselines_for
    from models.checkpoint import checkpoint_dict
    from models.factory import build_config
    from models.ranking import MappedScorer
    from models.trainer import TrainConfig, train_model
    from recloop.contract import coerce_events
    from recloop.cursor import LogCursor, read_new
    from recloop.eventlog import EventLog
    from recloop.lake import Lake
    from recloop.loop_sample import replay_sample
    from recloop.policy import EventPolicy
    from recloop.sources import load_source
    from recloop.sources.base import SourceFrames

    n_users, n_items = max(1000, n_lake // 50), _items(n_lake, items)
    policy = EventPolicy()
    t_setup = time.perf_counter()
    lake = Lake(workdir / f"incr-lake-{n_lake}")
    lake.ingest(load_source("synthetic", seed=seed, n_events=n_lake, n_users=n_users, n_items=n_items),
                batch_id="base")
    events0 = lake.events()
    features_dir = workdir / f"incr-features-{n_lake}"
    built = datetime.now(UTC)
    as_of0 = events0["timestamp"].max().to_pydatetime()
    write_feature_tables(build_feature_tables(events0, None, n=50, created_ts=built, as_of=as_of0, encoder=None,
                                              policy=policy), features_dir)
    write_state(features_dir, *full_state(events0, ["base"], as_of0, policy, history_len=50))
    champ_users = set(replay_sample(events0["user_id"].unique(), [], replay, seed, "champion"))
    champ_vocab, champ_split = prepare_split(events0[events0["user_id"].isin(champ_users)], policy=policy,
                                             extra_ids=events0["item_id"].unique())
    train_cfg = TrainConfig(epochs=epochs, patience=1, seed=seed, device="cpu")
    champion = train_model(champ_split, champ_vocab, build_config("sasrec", n_items=len(champ_vocab), max_seq_len=50),
                           train_cfg, progress=False).model
    del events0, champ_split
    new = load_source("synthetic", seed=seed + 1, n_events=NEW_EVENTS, n_users=NEW_EVENTS // 4, n_items=n_items).events
    new = new.assign(event_id=[f"new-{i}" for i in range(len(new))],
                     timestamp=pd.Timestamp.now(tz="UTC") - pd.to_timedelta(range(len(new), 0, -1), unit="s"))
    log = EventLog(f"sqlite:///{workdir / f'incr-log-{n_lake}.db'}")
    log.append(new)
    setup_s = time.perf_counter() - t_setup
    times: dict[str, float] = {}
    turn = "turn-1"

    t0 = time.perf_counter()
    rows, _ = read_new(log, LogCursor(), datetime.now(UTC))
    times["read_new_events"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = coerce_events(rows.drop(columns=["seq", "ingested_at"]), default_source="feedback")
    times["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lake.ingest(SourceFrames(events=batch), batch_id=turn)
    times["lake_ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    online = _RecordingStore()
    features = update_features(online, lake, features_dir, datetime.now(UTC), n=50, policy=policy)
    times["features_incremental"] = time.perf_counter() - t0
    if features is None:
        raise RuntimeError("the incremental features stage declined; the benchmark's new events must be newer")
    t0 = time.perf_counter()
    touched = sorted(set(batch["user_id"]))
    sample = replay_sample(lake.user_ids(), touched, replay, seed, turn)
    train_events = lake.events_of_users([*touched, *sample])
    vocab, split = prepare_split(train_events, champ_vocab, policy=policy)
    times["training_set"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lake_sha = lake.fingerprint()
    data_fingerprint(train_events, "parquet")
    times["fingerprint"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train_model(split, vocab, build_config("sasrec", n_items=len(vocab), max_seq_len=50), train_cfg,
                         init_state=checkpoint_dict(champion, champ_vocab), progress=False)
    times["train_warm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluated = sample_split(split, eval_users, seed, turn)
    names, _ = baselines_for(len(vocab), list(BASELINES))
    metrics = evaluate_all(evaluated, len(vocab), result.model, MappedScorer(champion, champ_vocab, vocab),
                           None, names)
    times["evaluate"] = time.perf_counter() - t0
    log.close()
    return {"n_lake": n_lake, "n_items": n_items, "new_events": len(batch), "stages_s": times,
            "total_s": sum(times.values()), "data_stages_s": sum(v for k, v in times.items()
                                                               if k not in ("train_warm", "evaluate")),
            "setup_s_untimed": setup_s, "lake_users": len(lake.user_ids()), "touched_users": len(touched),
            "replay_users": len(sample), "training_users": len(split.train), "eval_users": len(evaluated.test),
            "training_events": len(train_events), "features": {k: features[k] for k in
                                                               ("touched_users", "touched_items", "window_events",
                                                                "rows")},
            "online_rows_written": online.rows, "lake_sha256": lake_sha[:16],
            "ndcg@10": {"candidate": metrics["candidate"]["ndcg@10"], "champion": metrics["champion"]["ndcg@10"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--mode", choices=["after", "before", "both"], default="after",
                        help="after: the incremental turn; before: the turn as it was (whole lake)")
    parser.add_argument("--items", type=int, default=2000, help="catalogue size (0: events / 200, as before)")
    parser.add_argument("--replay-users", type=int, default=2000, help="settings.loop_replay_users")
    parser.add_argument("--eval-users", type=int, default=2000, help="settings.loop_eval_users")
    parser.add_argument("--epochs", type=int, default=1, help="warm retrain budget (epochs)")
    args = parser.parse_args(argv)
    from recloop.settings import configure_environment

    configure_environment()
    modes = ["before", "after"] if args.mode == "both" else [args.mode]
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            results = []
            for n in args.sizes:
                _log(f"{mode}: loop turn on a lake of {n:,} events ...")
                if mode == "before":
                    results.append(one_turn(n, args.seed, Path(tmp), args.items))
                else:
                    results.append(incremental_turn(n, args.seed, Path(tmp), args.items, args.replay_users,
                                                    args.eval_users, args.epochs))
                _log(json.dumps(results[-1]))
            ratio = results[-1]["total_s"] / results[0]["total_s"] if len(results) > 1 else None
            runs[mode] = {"results": results, "cost_ratio_last_over_first": ratio}
    doc = {"benchmark": "loop_turn", "protocol": {
        "data": "synthetic source (seeded), one user per 50 events, "
                + (f"{args.items} items" if args.items > 0 else "items = events / 200"), "seed": args.seed,
        "new_events": NEW_EVENTS, "event_policy": "EventPolicy() defaults",
        "before": "read past the cursor, validate, lake ingest, lake read, feature tables (no Feast apply/"
                  "materialise), training set (prepare_split) and fingerprint over the whole lake; not training/"
                  "evaluation",
        "after": "read, validate, lake ingest, incremental features (online write to a counting stub), training set "
                 f"(touched users + {args.replay_users} replay users, warm vocabulary), fingerprint (lake chain + "
                 f"training set), {args.epochs} warm-started SASRec epoch(s) on CPU, evaluation on {args.eval_users} "
                 "seeded users (candidate, champion, baselines; full ranking); set-up (lake, full feature build, "
                 "champion) untimed",
        "machine": "in-process, CPU"}, **{m: r for m, r in runs.items()}}
    out = json.dumps(doc, indent=None if args.json else 2)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
