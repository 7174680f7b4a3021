"""The incremental loop turn's pieces on real data (ml-100k): feature increments equal the full rebuild, the
replay and evaluation samples are seeded and sized, the lake's incremental reads and fingerprint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from featurestore.incremental import full_state, incremental_tables
from featurestore.materialize import build_feature_tables
from recloop import features_incremental as FI
from recloop.lake import Lake
from recloop.loop_sample import eval_sample, replay_sample
from recloop.policy import DEFAULT_POLICY
from recloop.sources import load_source
from recloop.sources.base import SourceFrames

BUILT = datetime(2024, 6, 1, tzinfo=UTC)
LATER = BUILT + timedelta(hours=1)
VALUES = {
    "user_recent_items": ["recent_item_ids"],
    "user_stats": ["n_events", "n_distinct_items", "last_event_ts", "mean_rating"],
    "item_stats": ["popularity", "popularity_7d", "popularity_30d", "mean_rating", "last_event_ts"],
}


@pytest.fixture(scope="module")
def ml100k_events(ml100k_path) -> pd.DataFrame:
    events = load_source("movielens-100k", ml100k_path).events
    return events.sort_values(["received_at"], kind="stable").reset_index(drop=True)


def _latest(table: pd.DataFrame, key: str, at: pd.Timestamp) -> pd.DataFrame:
    """What a point-in-time join at ``at`` returns per entity: the newest row (ties: newest created_ts)."""
    rows = table[table["event_ts"] <= at].sort_values(["event_ts", "created_ts"], kind="stable")
    return rows.drop_duplicates(key, keep="last").set_index(key).sort_index()


def _plain(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    out = frame[cols].copy()
    for c in cols:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: tuple(v) if isinstance(v, np.ndarray | list) else v)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("new_share", [0.03])
def test_incremental_rows_give_the_full_rebuilds_features_at_every_later_time(ml100k_events, new_share):
    events = ml100k_events
    order = FI.order_time(events)
    cut = order.quantile(1 - new_share)
    old, new = events[order <= cut], events[order > cut]
    assert len(new) > 1000 and new["user_id"].nunique() > 50
    as_old, as_new = FI.order_time(old).max(), FI.order_time(events).max()
    before = build_feature_tables(old, None, n=50, created_ts=BUILT, as_of=as_old, encoder=None)
    state, item_state = full_state(old, ["b0"], as_old.to_pydatetime(), history_len=50)
    assert pd.Timestamp(state["cut"]) == as_old

    history = events[events["user_id"].isin(new["user_id"].unique())]
    window = events[order > min(as_old, pd.Timestamp(state["as_of"])) - FI.WINDOW]
    added, next_state = incremental_tables(history, window, item_state, as_old.to_pydatetime(), n=50,
                                           created_ts=LATER, as_of=as_new.to_pydatetime())
    full = build_feature_tables(events, None, n=50, created_ts=BUILT, as_of=as_new, encoder=None)

    touched_users = set(new["user_id"])
    for view in ("user_recent_items", "user_stats"):  # exactly the full rebuild's new rows of the touched users
        want = full[view][(full[view]["event_ts"] > as_old)].reset_index(drop=True)
        assert set(want["user_id"]) <= touched_users
        got = added[view].sort_values(["user_id", "event_ts"], kind="stable").reset_index(drop=True)
        want = want.sort_values(["user_id", "event_ts"], kind="stable").reset_index(drop=True)
        cols = ["user_id", "event_ts", *VALUES[view]]
        pd.testing.assert_frame_equal(_plain(got, cols), _plain(want, cols))
    # through a point-in-time join: old tables + increment == full rebuild (users at any later time; items at the
    # new as_of: in between, a rebuild's stale items show their last event's counts, not the old snapshot's)
    key = {"user_recent_items": "user_id", "user_stats": "user_id", "item_stats": "item_id"}
    for at in (as_old + (as_new - as_old) / 2, as_new):
        for view, cols in VALUES.items():
            if view == "item_stats" and at != as_new:
                continue
            combined = pd.concat([before[view], added[view]], ignore_index=True)
            got = _plain(_latest(combined, key[view], at), cols)
            want = _plain(_latest(full[view], key[view], at), cols)
            pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9)
    # the item state carried forward is the whole data's
    pd.testing.assert_frame_equal(next_state, FI.item_state_table(DEFAULT_POLICY.positives(events)),
                                  check_exact=False, rtol=1e-9)


def test_replay_sample_is_seeded_sized_and_leaves_touched_users_out():
    users = [f"u{i}" for i in range(5000)]
    touched = users[:300]
    a = replay_sample(users, touched, 2000, seed=7, turn="batch-1")
    assert len(a) == len(set(a)) == 2000 and not set(a) & set(touched)
    assert a == replay_sample(list(reversed(users)), touched, 2000, seed=7, turn="batch-1")  # seeded, order-free
    assert a != replay_sample(users, touched, 2000, seed=7, turn="batch-2")  # another turn replays others
    assert a != replay_sample(users, touched, 2000, seed=8, turn="batch-1")
    assert replay_sample(users[:1000], touched, 2000, seed=7, turn="t") == sorted(set(users[:1000]) - set(touched))
    with pytest.raises(ValueError, match="n=-1"):
        replay_sample(users, touched, -1, seed=7, turn="t")
    picked = eval_sample(np.array(users, dtype=object), 2000, seed=7, turn="t")
    assert len(picked) == 2000 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, eval_sample(np.array(users, dtype=object), 2000, seed=7, turn="t"))
    assert len(eval_sample(users[:10], 2000, seed=7, turn="t")) == 10


def test_lake_reads_by_user_and_by_time_and_its_fingerprint_follows_the_data(tmp_path, ml100k_events):
    events = ml100k_events.iloc[:20_000].reset_index(drop=True)
    lake = Lake(tmp_path / "lake")
    lake.ingest(SourceFrames(events=events.iloc[:15_000].reset_index(drop=True)), batch_id="b1")
    first = lake.fingerprint()
    report = lake.ingest(SourceFrames(events=events.iloc[10_000:].reset_index(drop=True)), batch_id="b2")
    assert (report.new_events, report.duplicates_dropped, report.total_events) == (5_000, 5_000, 20_000)
    second = lake.fingerprint()
    assert second != first
    lake.ingest(SourceFrames(events=events.iloc[:100].reset_index(drop=True)), batch_id="b3")  # duplicates only
    assert lake.fingerprint() == second
    twin = Lake(tmp_path / "twin")  # the same batches give the same fingerprint
    twin.ingest(SourceFrames(events=events.iloc[:15_000].reset_index(drop=True)), batch_id="b1")
    twin.ingest(SourceFrames(events=events.iloc[15_000:].reset_index(drop=True)), batch_id="b2")
    assert twin.fingerprint() == second

    everything = lake.events()
    users = everything["user_id"].drop_duplicates().iloc[:5].tolist()
    pd.testing.assert_frame_equal(lake.events_of_users(users),
                                  everything[everything["user_id"].isin(users)].reset_index(drop=True))
    after = everything["received_at"].iloc[18_000]
    pd.testing.assert_frame_equal(lake.events_received_after(after),
                                  everything[everything["received_at"] > after].reset_index(drop=True))
    assert lake.user_ids().tolist() == sorted(everything["user_id"].unique())

    lake.delete_user(users[0])
    assert lake.fingerprint() != second
    with pytest.raises(ValueError, match="different content"):  # a colliding id is still found in the lake
        changed = events.iloc[[19_999]].assign(value=0.5).reset_index(drop=True)
        lake.ingest(SourceFrames(events=changed), batch_id="b4")


def test_sampled_evaluation_scores_every_model_on_one_seeded_fixed_size_sample():
    from flows.evaluate import sample_split
    from models.sequences import leave_one_out

    split = leave_one_out({f"u{i:02d}": np.arange(1, 6 + i % 3) for i in range(50)})
    small = sample_split(split, 10, seed=1, turn="t")
    assert len(small.test) == len(small.valid) == 10
    assert small.test.user_ids.tolist() == small.valid.user_ids.tolist()  # the same users on both splits
    assert small.train is split.train and small.protocol["eval_users"] == 10
    assert sample_split(split, 10, seed=1, turn="t").test.user_ids.tolist() == small.test.user_ids.tolist()
    assert len(sample_split(split, 500, seed=1, turn="t").test) == 50
