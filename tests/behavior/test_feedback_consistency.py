"""Feedback behaviour of the serving core over the real SQLite event log (in-process, fast)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import torch

from models.sasrec import SASRec, SASRecConfig
from models.vocab import ItemVocabulary
from recloop.eventlog import EventLog
from serving.recommender import RecommenderCore, build_served


class SlowOnline:
    """Online store whose push yields the GIL mid-write, to widen race windows."""

    def __init__(self) -> None:
        self.rows: dict[str, list[str]] = {}

    def recent_items(self, user_id: str) -> list[str] | None:
        return self.rows.get(user_id)

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None:
        snapshot = list(items)
        threading.Event().wait(0.0005)
        self.rows[user_id] = snapshot


def _core(tmp_path: Path) -> RecommenderCore:
    torch.manual_seed(0)
    vocab = ItemVocabulary([str(i) for i in range(1, 31)])
    model = SASRec(SASRecConfig(n_items=30, max_seq_len=8, d_model=16, dropout=0.0))
    served = build_served(model, vocab, "1")
    return RecommenderCore(served, SlowOnline(), EventLog(f"sqlite:///{tmp_path / 'log.db'}"), max_seq_len=8)


def test_concurrent_feedback_for_one_user_loses_no_update(tmp_path: Path) -> None:
    core = _core(tmp_path)

    def client(c: int) -> None:
        for j in range(25):
            core.feedback("u", str(1 + (c * 25 + j) % 30), "view", event_id=f"e-{c}-{j}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(core.events.recent_items("u", 1000)) == 200
    assert core.online.recent_items("u") == core.events.recent_items("u", 8)


def test_replayed_event_id_is_stored_once_and_still_acknowledged(tmp_path: Path) -> None:
    core = _core(tmp_path)
    ts = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)  # a retry repeats the event, timestamp included
    first = core.feedback("u", "3", "click", timestamp=ts, event_id="same")
    second = core.feedback("u", "3", "click", timestamp=ts, event_id="same")
    assert (first["inserted"], second["inserted"]) == (True, False)
    assert core.events.recent_items("u", 10) == ["3"] and core.online.recent_items("u") == ["3"]


def test_feedback_on_a_seen_item_moves_it_out_of_the_next_recommendation(tmp_path: Path) -> None:
    core = _core(tmp_path)
    top = core.recommend("v", k=5)["items"][0]["item_id"]
    core.feedback("v", top, "like")
    after = core.recommend("v", k=5)
    assert after["cold_start"] is False and top not in [x["item_id"] for x in after["items"]]
