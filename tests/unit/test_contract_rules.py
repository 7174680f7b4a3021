"""The data contract's row rules are one definition: the strict loader, the quarantine and the event
log's dict path agree on every kind of bad id, type, value and timestamp."""

from __future__ import annotations

import pandas as pd
import pytest

from recloop.contract import MAX_ID_CHARS, ContractError, coerce_events, event_violations, id_violation
from recloop.eventlog import _coerce_dicts
from recloop.quarantine import split_events
from recloop.sources.checks import event_problems

GOOD = {"user_id": "u1", "item_id": "i1", "event_type": "click", "value": None, "timestamp": 1_600_000_000}
BAD_CELLS = [
    ("user_id", None, "must not be null"),
    ("user_id", "   ", "must not be empty"),
    ("user_id", -3, "numeric ids must be >= 0"),
    ("item_id", 2.5, "numeric ids must be whole numbers"),
    ("item_id", "x" * (MAX_ID_CHARS + 1), f"must be at most {MAX_ID_CHARS} characters"),
    ("event_type", "hover", "must be one of"),
    ("value", "four", "must be numeric or null"),
    ("timestamp", "yesterday", "unparsable timestamp"),
]


@pytest.mark.parametrize(("column", "value", "rule"), BAD_CELLS)
def test_every_checker_reports_the_same_rule(column: str, value: object, rule: str) -> None:
    row = {**GOOD, column: value}
    frame = pd.DataFrame([GOOD, row], dtype=object)
    assert rule in event_violations(frame)[column].iloc[1] and event_violations(frame)[column].iloc[0] == ""
    problems = event_problems(frame)
    assert problems["row"].tolist() == [1] and rule in problems["rule"].iloc[0]
    split = split_events(frame, "test")
    assert split.good_rows.tolist() == [0] and f"{column}: {rule}" in split.rejected["reason"].iloc[0]
    with pytest.raises(ContractError, match=column):
        coerce_events(frame, default_source="test")
    if value is not None:  # the dict path reports missing keys separately
        with pytest.raises(ContractError, match=column):
            _coerce_dicts([{**row, "source": "api"}])


def test_valid_ids_are_normalised_the_same_everywhere() -> None:
    assert id_violation(7.0) == "" and id_violation("007") == "" and id_violation(" a ") == ""
    frame = pd.DataFrame([{**GOOD, "user_id": 7.0, "item_id": " a "}], dtype=object)
    coerced = coerce_events(frame, default_source="test")
    (row,) = _coerce_dicts([{**GOOD, "user_id": 7.0, "item_id": " a ", "source": "api"}])
    assert coerced["user_id"].iloc[0] == row["user_id"] == "7"
    assert coerced["item_id"].iloc[0] == row["item_id"] == "a"
    assert coerced["timestamp"].iloc[0] == row["timestamp"]  # both read numbers as Unix seconds


def test_a_rating_needs_a_value_inside_the_range() -> None:
    from recloop.contract import rating_violation

    assert rating_violation("click", None, 1, 5) == ""
    assert rating_violation("rating", 4.0, 1, 5) == ""
    assert "needs a value" in rating_violation("rating", None, 1, 5)
    assert "needs a value" in rating_violation("rating", float("nan"), 1, 5)
    assert "outside the rating range" in rating_violation("rating", 9.0, 1, 5)
