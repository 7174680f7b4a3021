from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recloop.contract import EVENT_COLUMNS, ContractError, coerce_events, coerce_items, coerce_users


def _events(**overrides: object) -> pd.DataFrame:
    base = {
        "user_id": [1, 2],
        "item_id": [10, 11],
        "event_type": ["rating", "click"],
        "value": [4.0, None],
        "timestamp": [881250949, 891717742],
        "source": ["t", "t"],
    }
    base.update(overrides)
    return pd.DataFrame(base)


def test_coerce_events_gives_exact_columns_and_dtypes() -> None:
    out = coerce_events(_events())
    assert tuple(out.columns) == EVENT_COLUMNS
    assert out["user_id"].tolist() == ["1", "2"]
    assert str(out["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert out["timestamp"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")
    assert np.isnan(out["value"].iloc[1])


def test_derived_event_ids_are_deterministic_and_distinct_for_repeats() -> None:
    df = _events(user_id=[1, 1], item_id=[10, 10], event_type=["click", "click"], timestamp=[5, 5])
    a, b = coerce_events(df), coerce_events(df)
    assert a["event_id"].tolist() == b["event_id"].tolist()
    assert a["event_id"].nunique() == 2


@pytest.mark.parametrize(
    ("overrides", "column"),
    [
        ({"event_type": ["rating", "teleport"]}, "event_type"),
        ({"value": ["4", "abc"]}, "value"),
        ({"timestamp": ["2020-01-01", "not a date"]}, "timestamp"),
        ({"user_id": [1, None]}, "user_id"),
        ({"user_id": [-1, 2]}, "user_id"),
        ({"item_id": [1.5, 2]}, "item_id"),
    ],
)
def test_bad_events_name_the_column(overrides: dict, column: str) -> None:
    with pytest.raises(ContractError, match=rf"events\.{column}"):
        coerce_events(_events(**overrides))


def test_missing_column_is_named() -> None:
    with pytest.raises(ContractError, match="item_id"):
        coerce_events(_events().drop(columns=["item_id"]))


def test_items_split_genres_and_reject_duplicates() -> None:
    items = coerce_items(pd.DataFrame({"item_id": [1, 2], "title": ["A", "B"], "genres": ["X|Y", ["Z"]]}))
    assert items["genres"].tolist() == [["X", "Y"], ["Z"]]
    assert items["text"].iloc[0] == "A. X, Y"
    with pytest.raises(ContractError, match="unique"):
        coerce_items(pd.DataFrame({"item_id": [1, 1]}))


def test_users_keep_attributes() -> None:
    users = coerce_users(pd.DataFrame({"user_id": [7], "age": [30]}))
    assert users.columns.tolist() == ["user_id", "age"]
    assert users["user_id"].iloc[0] == "7"
