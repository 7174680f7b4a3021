"""The event policy (recloop/policy.py): one definition, its vectorised and SQL forms agree with it."""

from __future__ import annotations

import itertools
import math
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recloop.contract import EVENT_TYPES
from recloop.eventlog import EventLog
from recloop.policy import DEFAULT_POLICY, EventPolicy, event_role
from recloop.settings import Settings

POLICIES = [
    DEFAULT_POLICY,
    EventPolicy(rating_negative_below=3.0),
    EventPolicy(positive=frozenset({"click", "purchase"}), negative=frozenset({"skip", "rating"})),
    EventPolicy(positive=frozenset({"click", "rating"}), negative=frozenset(), rating_negative_below=2.5),
]
VALUES = [None, math.nan, 0.5, 2.5, 2.4999, 3.0, 5.0]


def test_defaults_follow_the_issue() -> None:
    assert {t: event_role(t) for t in EVENT_TYPES} == {
        "view": "positive", "click": "positive", "like": "positive", "rating": "positive",
        "purchase": "positive", "skip": "negative",
    }
    assert event_role(" SKIP ") == "negative"  # the contract's spelling rules apply
    assert event_role("rating", 1.0) == "positive"  # every rating is consumption by default
    assert event_role("rating", 2.9, EventPolicy(rating_negative_below=3.0)) == "negative"
    assert event_role("rating", 3.0, EventPolicy(rating_negative_below=3.0)) == "positive"
    assert event_role("rating", None, EventPolicy(rating_negative_below=3.0)) == "positive"
    assert event_role("bogus") == "context" and event_role(None) == "context"
    ctx = EventPolicy(positive=frozenset({"click"}), negative=frozenset({"skip"}))
    assert ctx.context == frozenset({"view", "like", "rating", "purchase"})
    assert event_role("view", None, ctx) == "context"


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown event types"):
        EventPolicy(positive=frozenset({"clicked"}))
    with pytest.raises(ValueError, match="both positive and negative"):
        EventPolicy(positive=frozenset({"skip"}))
    with pytest.raises(ValueError, match="suppress_s"):
        EventPolicy(suppress_s=-1)
    with pytest.raises(ValueError):
        Settings(event_negative="skip,nope")
    s = Settings(event_positive="click, purchase", event_negative="skip", rating_negative_below=2.0)
    assert s.event_policy == EventPolicy(positive=frozenset({"click", "purchase"}), negative=frozenset({"skip"}),
                                         rating_negative_below=2.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_vectorised_roles_equal_the_scalar_function(policy: EventPolicy) -> None:
    types, values = zip(*itertools.product([*EVENT_TYPES, "Click", "other"], VALUES), strict=True)
    expected = [event_role(t, v, policy) for t, v in zip(types, values, strict=True)]
    assert policy.roles(types, values).tolist() == expected
    frame = pd.DataFrame({"event_type": types, "value": pd.to_numeric(pd.Series(values, dtype=object))})
    assert policy.positive_mask(frame).tolist() == [r == "positive" for r in expected]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    return Settings().postgres_url


@pytest.mark.parametrize("policy", POLICIES)
def test_the_logs_sql_form_equals_the_function(log_url: str, policy: EventPolicy) -> None:
    """``EventLog.recent_items`` keeps exactly the events ``event_role`` calls positive, in log order."""
    table = f"events_policy_{uuid.uuid4().hex[:8]}"
    try:
        log = EventLog(log_url, table_name=table)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"database not reachable: {err}")
    try:
        log.policy = policy
        rows, t0 = [], pd.Timestamp("2024-01-01T00:00:00Z")
        for k, (t, v) in enumerate(itertools.product(EVENT_TYPES, [None, 1.0, 2.5, 3.0, 5.0])):
            if t == "rating" and v is None:
                continue  # the contract's rating rule (the service refuses it before the log)
            rows.append({"user_id": "u", "item_id": f"{t}-{v}", "event_type": t, "value": v,
                         "timestamp": t0 + pd.Timedelta(seconds=k)})
        log.append(rows)
        expected = [r["item_id"] for r in rows if event_role(r["event_type"], r["value"], policy) == "positive"]
        assert log.recent_items("u", 1000) == expected
        consumed, suppressed = log.user_state("u")
        assert consumed == set(expected)
        negatives = {r["item_id"] for r in rows if event_role(r["event_type"], r["value"], policy) == "negative"}
        assert set(suppressed) == negatives
        assert np.all([until > pd.Timestamp.now(tz="UTC") for until in suppressed.values()])
    finally:
        log.drop()
        log.close()
