"""The stored GX suites: JSON in sync with the builders; a clean frame passes, each broken frame fails."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from expectations.runner import SUITES, SuiteRunner, suite_path, suite_to_json
from flows.validate import _events_view
from recloop.contract import coerce_events
from recloop.quarantine import DataValidationError, split_events

NOW = pd.Timestamp("2026-01-01", tz="UTC")
PARAMS = {
    "rating_min": 1.0,
    "rating_max": 5.0,
    "ts_min": pd.Timestamp("1990-01-01", tz="UTC"),
    "ts_max": NOW,
    "known_item_ids": [f"i{i}" for i in range(10)],
    "known_item_mostly": 0.9,
    "bot_max_user_share": 0.3,
}


def _events(n: int = 40) -> pd.DataFrame:
    raw = pd.DataFrame(
        {
            "user_id": [f"u{i % 5}" for i in range(n)],
            "item_id": [f"i{i % 10}" for i in range(n)],
            "event_type": "rating",
            "value": [float(1 + i % 5) for i in range(n)],
            "timestamp": [1_600_000_000 + i for i in range(n)],
        }
    )
    return coerce_events(raw, default_source="test")


def _failed(table: str, frame: pd.DataFrame, params: dict | None = None) -> set[str]:
    return {o.key for o in SuiteRunner().run(table, frame, params) if not o.success}


@pytest.mark.parametrize("name", sorted(SUITES))
def test_stored_json_matches_builder(name: str) -> None:
    stored = json.loads(suite_path(name).read_text())
    assert stored == json.loads(json.dumps(suite_to_json(SUITES[name].build_suite())))


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_expectation_declares_its_gate_policy(name: str) -> None:
    for exp in json.loads(suite_path(name).read_text())["expectations"]:
        assert exp["meta"]["on_fail"] in {"stop", "quarantine"}, exp


def test_clean_events_pass() -> None:
    assert _failed("events", _events_view(_events()), PARAMS) == set()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda f: f.assign(value=f["value"].where(f.index != 3, 9.0)),
         "events.expect_column_values_to_be_between(value)"),
        (lambda f: f.assign(timestamp=f["timestamp"].where(f.index != 3, NOW + pd.Timedelta(days=1))),
         "events.expect_column_values_to_be_between(timestamp)"),
        (lambda f: f.assign(event_type=f["event_type"].where(f.index != 3, "hover")),
         "events.expect_column_values_to_be_in_set(event_type)"),
        (lambda f: f.assign(event_id=f["event_id"].where(f.index != 3, f["event_id"][0])),
         "events.expect_column_values_to_be_unique(event_id)"),
        (lambda f: f.assign(item_id=f["item_id"].where(f.index > 8, "new")),
         "events.expect_column_values_to_be_in_set(item_id)"),
        (lambda f: f.assign(user_id=f["user_id"].where(f.index > 20, "bot")),
         "events.expect_column_max_to_be_between(user_share)"),
        (lambda f: f.assign(user_id=f["user_id"].str[1:].astype(int)),
         "events.expect_column_values_to_be_of_type(user_id)"),
        (lambda f: f.iloc[:0], "events.expect_table_row_count_to_be_between"),
        (lambda f: f.assign(extra=1), "events.expect_table_columns_to_match_set"),
    ],
)  # fmt: skip
def test_each_broken_events_frame_fails_its_expectation(mutate, expected: str) -> None:
    frame = mutate(_events())
    assert expected in _failed("events", _events_view(frame).reset_index(drop=True), PARAMS)


def test_dimension_suites_catch_duplicate_and_null_keys() -> None:
    items = pd.DataFrame({"item_id": ["a", "b", "b"], "title": ["A", "B", "B2"]})
    assert _failed("items", items) == {"items.expect_column_values_to_be_unique(item_id)"}
    assert _failed("items", items.drop(columns="title").iloc[:2]) == {"items.expect_column_to_exist(title)"}
    users = pd.DataFrame({"user_id": ["1", None, "3"]})
    assert _failed("users", users) == {"users.expect_column_values_to_not_be_null(user_id)"}


def test_missing_suite_parameter_is_an_error() -> None:
    with pytest.raises(ValueError, match="missing suite parameters"):
        SuiteRunner().run("events", _events_view(_events()), {})


def test_split_events_keeps_original_values_and_reasons() -> None:
    raw = pd.DataFrame(
        {
            "user_id": [1, None, -2, 4, 5],
            "item_id": ["a", "b", "c", "d", "e"],
            "event_type": ["rating", "rating", "rating", "hover", "rating"],
            "value": [4, 3, "x", 2, 1],
            "timestamp": [1_600_000_000, 1, 2, 3, "not a time"],
        }
    )
    good, rejected, rows = split_events(raw, "test")
    assert good["user_id"].tolist() == ["1"] and rows.tolist() == [0]
    assert rejected["row"].tolist() == [1, 2, 3, 4]
    assert rejected["reason"].tolist() == [
        "user_id: must not be null",
        "user_id: numeric ids must be >= 0; value: must be numeric or null",
        "event_type: must be one of ['view', 'click', 'like', 'rating', 'purchase', 'skip']",
        "timestamp: unparsable timestamp",
    ]
    assert rejected["value"].tolist() == [3, "x", 2, 1]  # original values, not coerced


def test_split_events_missing_column_is_structural() -> None:
    raw = pd.DataFrame({"userId": [1], "item_id": [1], "event_type": ["rating"], "timestamp": [1]})
    with pytest.raises(DataValidationError, match=r"missing \['user_id'\]") as err:
        split_events(raw, "test")
    assert err.value.failing == ["events.columns: missing ['user_id']"]
