"""The pure feature-table transforms (recloop.features) on hand-made events: no Feast needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from featurestore.materialize import materialize_window
from recloop import features as F
from recloop.contract import coerce_events

NOW = datetime(2024, 6, 1, tzinfo=UTC)
T = pd.Timestamp("2024-01-01", tz="UTC")


def _ev(rows: list[tuple[str, str, float | None, pd.Timestamp]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "value", "timestamp"]).assign(event_type="rating")
    return coerce_events(df, default_source="test")


def test_recent_items_keep_row_order_within_a_timestamp_tie_and_truncate_to_n():
    ev = _ev(
        [("u", "c", 1, T + timedelta(1)), ("u", "a", 2, T), ("u", "b", 3, T), ("u", "d", 4, T + timedelta(2))]
    )
    table = F.user_recent_items_table(ev, 3, NOW)
    assert table["event_ts"].tolist() == [T, T + timedelta(1), T + timedelta(2)]  # one row per timestamp
    assert [list(x) for x in table["recent_item_ids"]] == [["a", "b"], ["a", "b", "c"], ["b", "c", "d"]]
    latest = F.user_recent_items_table(ev, 3, NOW, latest_only=True)
    assert len(latest) == 1 and list(latest["recent_item_ids"][0]) == ["b", "c", "d"]


def test_user_stats_are_cumulative_and_ignore_null_values_in_the_mean():
    ev = _ev([("u", "a", 4, T), ("u", "a", None, T + timedelta(1)), ("u", "b", 2, T + timedelta(2))])
    table = F.user_stats_table(ev, NOW)
    assert table["n_events"].tolist() == [1, 2, 3]
    assert table["n_distinct_items"].tolist() == [1, 1, 2]
    assert table["mean_rating"].tolist() == [4.0, 4.0, 3.0]


def test_item_trailing_popularity_counts_only_the_window_and_as_of_snapshots_decay():
    days = [0, 1, 20, 29, 40]
    ev = _ev([(f"u{d}", "x", 5, T + timedelta(days=d)) for d in days])
    table = F.item_stats_table(ev, NOW, as_of=T + timedelta(days=52))
    rows = table.set_index("event_ts")
    at29, at40, snap = rows.loc[T + timedelta(29)], rows.loc[T + timedelta(40)], rows.loc[T + timedelta(52)]
    assert (at29["popularity"], at29["popularity_7d"], at29["popularity_30d"]) == (
        4,
        1,
        4,
    )  # windows (22, 29] and (-1, 29]
    assert (at40["popularity"], at40["popularity_7d"], at40["popularity_30d"]) == (5, 1, 3)
    assert (snap["popularity"], snap["popularity_7d"], snap["popularity_30d"]) == (5, 0, 2)  # decayed
    assert snap["last_event_ts"] == T + timedelta(40)


def test_latest_rows_pick_each_entitys_newest_row_inside_the_window():
    ev = _ev([("u", "a", 1, T), ("u", "b", 1, T + timedelta(5)), ("v", "c", 1, T + timedelta(9))])
    table = F.user_recent_items_table(ev, 5, NOW)
    rows = F.latest_rows(table, "user_id", T, T + timedelta(6))
    assert rows["user_id"].tolist() == ["u"] and list(rows["recent_item_ids"][0]) == ["a", "b"]


def test_item_content_embeds_title_genres_and_text_once():
    class Recorder:
        texts: list[str] = []

        def encode(self, sentences, **kw):
            Recorder.texts = list(sentences)
            return np.ones((len(sentences), 4))

    items = pd.DataFrame(
        {
            "item_id": ["1", "2"],
            "title": ["Up", "Heat"],
            "genres": [["Kids"], []],
            "text": ["Up. Kids", "a heist"],
            "created_at": [pd.NaT, T],
        }
    )
    table = F.item_content_table(items, Recorder(), NOW)
    assert Recorder.texts == ["Up. Kids", "Heat. a heist"]
    assert table["event_ts"].tolist() == [pd.Timestamp(NOW), T] and len(table["embedding"][0]) == 4


def test_materialize_window_ignores_the_future_and_starts_at_the_watermark():
    wm = NOW - timedelta(days=1)
    assert materialize_window(None, NOW + timedelta(days=900), NOW, 0) == (
        datetime(1970, 1, 1, tzinfo=UTC),
        NOW,
    )
    assert materialize_window(wm, NOW, NOW, 60) == (wm - timedelta(seconds=60), NOW)
    assert materialize_window(wm, wm, NOW, 60) is None  # nothing newer than the watermark
    assert materialize_window(wm, None, NOW, 60) is None
    assert (
        F.feature_tables_max_ts([pd.DataFrame({"event_ts": [T, pd.Timestamp(NOW) + timedelta(1)]})], NOW) == T
    )
