"""One ``skip`` through the four places that build a history (recloop/policy.py), on ml-100k.

Training sequences, the event log's recent-items read, the online push and the serving mask: the
skipped item is never a target, never in the served history, and the next recommend drops it while
the rest of the list keeps its order. With ``rating_negative_below`` set, a low rating does the same.
The default policy leaves the ml-100k benchmark's sequences (hence its figures) unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fakes import MemoryOnline

from featurestore.materialize import build_feature_tables
from flows.train import prepare_split
from models.factory import build_config, build_model
from models.sequences import build_sequences, leave_one_out
from models.vocab import ItemVocabulary
from recloop.eventlog import EventLog
from recloop.policy import DEFAULT_POLICY, EventPolicy
from recloop.sources import load_source
from serving.recommender import RecommenderCore, build_served

MAX_SEQ_LEN = 20
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def ml100k_events(ml100k_path: Path) -> pd.DataFrame:
    return load_source("movielens-100k", ml100k_path).events


def _one_user(events: pd.DataFrame, user: str = "1", n: int = 30) -> pd.DataFrame:
    return events[events["user_id"] == user].sort_values("timestamp", kind="stable").head(n).reset_index(drop=True)


def _with_event(events: pd.DataFrame, user: str, item: str, event_type: str, value: float | None,
                after: pd.Timestamp) -> pd.DataFrame:
    row = events.iloc[[0]].copy()
    row[["user_id", "item_id", "event_type", "timestamp"]] = [user, item, event_type, after]
    row["value"] = np.nan if value is None else value
    row["event_id"] = f"policy-test-{event_type}"
    if "received_at" in row:
        row["received_at"] = after
    return pd.concat([events, row], ignore_index=True)


@pytest.mark.parametrize(
    ("policy", "event_type", "value"),
    [(DEFAULT_POLICY, "skip", None), (EventPolicy(rating_negative_below=3.0), "rating", 1.0)],
    ids=["skip", "low-rating"],
)
def test_a_negative_is_never_a_target_nor_history_and_is_masked_next(
    ml100k_events: pd.DataFrame, tmp_path: Path, policy: EventPolicy, event_type: str, value: float | None
) -> None:
    user = "1"
    mine = _one_user(ml100k_events, user)
    rejected = next(i for i in ml100k_events["item_id"].unique() if i not in set(mine["item_id"]))
    last = mine["timestamp"].max() + pd.Timedelta(seconds=1)
    # The negative comes last: under "every event is a positive" it would be the user's test target.
    events = _with_event(ml100k_events[ml100k_events["user_id"] != user].head(2000).pipe(
        lambda e: pd.concat([e, mine], ignore_index=True)), user, rejected, event_type, value, last)

    # 1. training sequences: never a target, never in a history
    vocab, split = prepare_split(events, policy=policy)
    assert split.protocol["event_policy"] == policy.describe()
    idx = int(vocab.encode([rejected])[0]) if rejected in vocab else -1
    user_row = list(split.test.user_ids).index(user)
    assert split.test.targets[user_row] != idx
    assert idx not in split.test.histories[user_row]
    assert idx not in split.train[user]
    naive_vocab = ItemVocabulary.from_ids(events["item_id"].astype(str).unique())
    naive = leave_one_out(build_sequences(events, naive_vocab))
    naive_row = list(naive.test.user_ids).index(user)
    assert naive.test.targets[naive_row] == int(naive_vocab.encode([rejected])[0])  # what the policy fixes

    # (the materialised history view drops it too)
    tables = build_feature_tables(events, None, n=MAX_SEQ_LEN, created_ts=NOW, as_of=NOW, encoder=None,
                                  policy=policy)
    rows = tables["user_recent_items"]
    assert not any(rejected in items for items in rows.loc[rows["user_id"] == user, "recent_item_ids"])

    # 2-4. the log's read, the online push and the mask, through the serving core
    serve_vocab = ItemVocabulary.from_ids(ml100k_events["item_id"].astype(str).unique())
    model = build_model(build_config("sasrec", n_items=len(serve_vocab), max_seq_len=MAX_SEQ_LEN, d_model=16))
    served = build_served(model, serve_vocab, "1")
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.policy = policy
    online = MemoryOnline()
    core = RecommenderCore(served, online, log, max_seq_len=MAX_SEQ_LEN, policy=policy)
    for row in mine.itertuples():
        core.feedback(user, row.item_id, row.event_type, row.value, row.timestamp.to_pydatetime())
    pushed_before = list(online.rows[user])
    before = [x["item_id"] for x in core.recommend(user, k=10)["items"]]
    # make the rejected item the user's current top-1, so its removal is visible
    rejected = before[0]
    out = core.feedback(user, rejected, event_type, value, last.to_pydatetime())
    assert out["role"] == "negative" and out["inserted"]
    assert rejected not in log.recent_items(user, MAX_SEQ_LEN)  # 2. the log's recent-items read
    assert online.rows[user] == pushed_before  # 3. the online push: the history is unchanged
    after = [x["item_id"] for x in core.recommend(user, k=10)["items"]]  # 4. the mask
    assert rejected not in after
    assert after[:9] == before[1:]  # the rest keeps its order
    assert log.get(out["event_id"])["event_type"] == event_type  # stored, for analytics and OPE
    # a positive on the same item later is consumption: still masked (seen), now in the history
    core.feedback(user, rejected, "click", None, (last + pd.Timedelta(seconds=1)).to_pydatetime())
    assert online.rows[user][-1] == rejected
    log.close()


def test_suppression_expires_and_is_shared_through_the_log(tmp_path: Path) -> None:
    """A negative suppresses its item for ``suppress_s`` (server receive time), for any worker reading the log."""
    from fakes import tiny_served

    url = f"sqlite:///{tmp_path / 'log.db'}"
    policy = EventPolicy(suppress_s=3600.0)
    log_a, log_b = EventLog(url), EventLog(url)
    log_a.policy = log_b.policy = policy
    worker_a = RecommenderCore(tiny_served(), MemoryOnline(), log_a, max_seq_len=8, policy=policy)
    worker_b = RecommenderCore(tiny_served(), MemoryOnline(), log_b, max_seq_len=8, policy=policy)
    worker_a.feedback("u", "i1", "click")
    top = worker_b.recommend("u", k=5)["items"][0]["item_id"]
    worker_a.feedback("u", top, "skip")
    assert top not in [x["item_id"] for x in worker_b.recommend("u", k=5)["items"]]  # the other worker sees it
    unmasked = [x["item_id"] for x in worker_b.recommend("u", k=50, exclude_seen=False)["items"]]
    assert "i1" in unmasked and top not in unmasked  # "not interested" holds even without exclude_seen
    consumed, suppressed = log_b.user_state("u")
    assert consumed == {"i1"} and set(suppressed) == {top}
    later = datetime.now(UTC) + pd.Timedelta(hours=2)
    assert log_b.user_state("u", now=later)[1] == {}  # expired
    assert top in worker_b.seen_items("u", [], None) and top not in worker_b.seen_items("u", [], None, now=later)
    log_a.close()
    log_b.close()


def test_default_policy_keeps_the_ml100k_benchmark_sequences(ml100k_events: pd.DataFrame) -> None:
    """The bench (bench/quality.py) trains on the policy's positives: by default all of ml-100k, unchanged."""
    positives = DEFAULT_POLICY.positives(ml100k_events)
    assert len(positives) == len(ml100k_events) == 100_000
    vocab = ItemVocabulary.from_ids(ml100k_events["item_id"])
    old = leave_one_out(build_sequences(ml100k_events, vocab))
    new = leave_one_out(build_sequences(positives, vocab))
    assert np.array_equal(old.test.targets, new.test.targets) and np.array_equal(old.valid.targets, new.valid.targets)
    assert all(np.array_equal(old.train[u], new.train[u]) for u in old.train)
