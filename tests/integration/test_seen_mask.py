""""Seen" is the whole consumed set: on every ml-100k user with more than max_seq_len events, no item
the user consumed comes back with exclude_seen — not only the items of the model's 50-item window."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from models.factory import build_config, build_model
from models.vocab import ItemVocabulary
from recloop.lake import Lake
from recloop.sources import load_source
from serving.recommender import RecommenderCore, build_served
from serving.runtime import load_catalogue

MAX_SEQ_LEN = 50


class WindowOnline:
    """The online store as materialised: each user's last MAX_SEQ_LEN lake items."""

    def __init__(self, base: dict) -> None:
        self.base = base

    def recent_items(self, user_id: str) -> list[str] | None:
        return self.base.get(user_id, (None, None))[0]

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None:
        raise AssertionError("recommend never pushes")


class NoLog:
    def recent_items(self, user_id: str, n: int, after_ts=None) -> list[str]:
        return []


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory, ml100k_path: Path):
    root = tmp_path_factory.mktemp("lake")
    Lake(root).ingest(load_source("movielens-100k", ml100k_path))
    return load_catalogue(root, MAX_SEQ_LEN)


def test_no_consumed_item_comes_back_for_users_beyond_the_window(catalogue) -> None:
    vocab = ItemVocabulary.from_ids(sorted(catalogue.titles))
    model = build_model(build_config("sasrec", n_items=len(vocab), max_seq_len=MAX_SEQ_LEN, d_model=32))
    served = build_served(model, vocab, "1")
    long_users = [u for u, items in catalogue.consumed.items() if len(items) > MAX_SEQ_LEN]
    assert len(long_users) == 563  # ml-100k users with more than 50 events

    def leaks(core: RecommenderCore) -> int:
        return sum(
            len({x["item_id"] for x in core.recommend(u, k=10)["items"]} & catalogue.consumed[u]) for u in long_users
        )

    online = WindowOnline(catalogue.base_history)
    core = RecommenderCore(served, online, NoLog(), max_seq_len=MAX_SEQ_LEN, base_history=catalogue.base_history,
                           consumed=catalogue.consumed)
    assert leaks(core) == 0
    window_only = RecommenderCore(served, online, NoLog(), max_seq_len=MAX_SEQ_LEN,
                                  base_history=catalogue.base_history)
    assert leaks(window_only) > 0  # masking only the model's window lets consumed items back in
    with_history = core.recommend(long_users[0], k=10, history=["50", "181"])  # a request history adds to it
    assert not {x["item_id"] for x in with_history["items"]} & (catalogue.consumed[long_users[0]] | {"50", "181"})
