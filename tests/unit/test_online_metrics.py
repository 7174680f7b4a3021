"""recloop.online_metrics.online_metrics on a scripted session whose every figure is counted by hand.

The session (k = 3 slots per request, 3 users, variants champion (versions 2 and 3) and challenger (4)):

    r1 u1 v3 champion   [a b c]     click a @1, the same click again (duplicate), click c @3
    r2 u1 v3 champion   [d a e]     skip e @3; click z (not shown: unattributed)
    r3 u2 v3 champion   [b c f]     click f reported @2 but shown @3 (position mismatch)
    r4 u2 v4 challenger [a g h]     click g @2
    r5 u3 v4 challenger [c d g]     rating 2 on d @2 (negative: rating_negative_below=3), rating 5 on c @1
    r6 u3 v2 champion   [e f a]     view e (context under this policy: ignored), click a (no position)
    r0 (no exposure)    [a]         an orphan slot
    click a on r9 (unknown request), click b without request_id: unattributed
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recloop.online_metrics import DEFINITIONS, online_metrics
from recloop.policy import DEFAULT_POLICY, EventPolicy

POLICY = EventPolicy(positive=frozenset({"click", "rating"}), negative=frozenset({"skip"}),
                     rating_negative_below=3.0)
N_CATALOGUE = 20

SHOWN = {  # request -> (user, version, variant, items at positions 1..3)
    "r1": ("u1", "3", "champion", "abc"),
    "r2": ("u1", "3", "champion", "dae"),
    "r3": ("u2", "3", "champion", "bcf"),
    "r4": ("u2", "4", "challenger", "agh"),
    "r5": ("u3", "4", "challenger", "cdg"),
    "r6": ("u3", "2", "champion", "efa"),
}


def session() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    t0 = pd.Timestamp("2024-05-01", tz="UTC")
    exposures = pd.DataFrame([
        {"request_id": r, "user_id": u, "ts": t0 + pd.Timedelta(minutes=i), "model_version": v, "variant": var,
         "experiment_id": None, "arm": None, "policy": "greedy", "context": "[]"}
        for i, (r, (u, v, var, _)) in enumerate(SHOWN.items())
    ])
    items = pd.DataFrame(
        [{"request_id": r, "position": p, "item_id": item, "score": 1.0 / p, "team": None, "propensity": None}
         for r, (*_, shown) in SHOWN.items() for p, item in enumerate(shown, start=1)]
        + [{"request_id": "r0", "position": 1, "item_id": "a", "score": 1.0, "team": None, "propensity": None}]
    )
    rows = [  # (request_id, position, user_id, item_id, event_type, value)
        ("r1", 1, "u1", "a", "click", None),
        ("r1", 1, "u1", "a", "click", None),      # duplicate: counts once
        ("r1", 3, "u1", "c", "click", None),
        ("r2", 3, "u1", "e", "skip", None),
        ("r2", 2, "u1", "z", "click", None),      # z was not shown: unattributed (item_not_shown)
        ("r3", 2, "u2", "f", "click", None),      # f was shown at 3: counted at 3, position_mismatch
        ("r4", 2, "u2", "g", "click", None),
        ("r5", 2, "u3", "d", "rating", 2.0),      # below 3: negative = a skip
        ("r5", 1, "u3", "c", "rating", 5.0),      # positive = a click
        ("r6", 1, "u3", "e", "view", None),       # context under POLICY: neither
        ("r6", None, "u3", "a", "click", None),   # no position given: no check, counted at 3
        ("r9", 1, "u1", "a", "click", None),      # unknown request: unattributed (unknown_request)
        (None, None, "u2", "b", "click", None),   # no request_id: unattributed (no_request_id)
    ]
    events = pd.DataFrame(rows, columns=["request_id", "position", "user_id", "item_id", "event_type", "value"])
    events["timestamp"] = [t0 + pd.Timedelta(minutes=10 + i) for i in range(len(events))]
    events["received_at"] = events["timestamp"]
    return exposures, items, events


def test_overall_and_variants_are_the_hand_count() -> None:
    exposures, items, events = session()
    out = online_metrics(exposures, items, events, POLICY, by="variant", k=2, n_catalogue=N_CATALOGUE)

    assert out["protocol"]["k"] == 2 and out["protocol"]["by"] == "variant"
    assert out["protocol"]["rating_negative_below"] == 3.0 and out["protocol"]["positive"] == ["click", "rating"]
    assert out["protocol"]["n_catalogue"] == N_CATALOGUE and out["protocol"]["definitions"] == DEFINITIONS

    assert out["overall"] == {
        "requests": 6,
        "users": 3,                        # u1, u2, u3
        "impressions": 18,                 # 6 requests x 3 slots (the orphan r0 slot is not one)
        "impressions@2": 12,               # 6 x 2
        "clicks": 6,                       # r1a, r1c, r3f, r4g, r5c, r6a
        "clicks@2": 3,                     # r1a@1, r4g@2, r5c@1
        "ctr@2": 0.25,                     # 3 / 12
        "ctr": 6 / 18,
        "ctr_by_position": [2 / 6, 1 / 6, 3 / 6],  # @1 r1a r5c; @2 r4g; @3 r1c r3f r6a
        "skips": 2,                        # r2e, r5d (rating 2)
        "skip_rate": 2 / 18,
        "request_ctr": 5 / 6,              # r1 r3 r4 r5 r6
        "items_shown": 8,                  # a..h
        "catalogue_share": 8 / 20, "freshness@2": None,
        "position_mismatch": 1,            # r3f
        "model_versions": ["2", "3", "4"],
        "variants": ["challenger", "champion"],
        "unattributed": 3,                 # 1 + 1 + 1
        "unattributed_by_reason": {"no_request_id": 1, "unknown_request": 1, "item_not_shown": 1},
        "orphan_impressions": 1,           # r0
    }
    assert list(out["groups"]) == ["challenger", "champion"]
    assert out["groups"]["champion"] == {
        "requests": 4,                     # r1 r2 r3 r6
        "users": 3,
        "impressions": 12,
        "impressions@2": 8,
        "clicks": 4,                       # r1a@1, r1c@3, r3f@3, r6a@3
        "clicks@2": 1,
        "ctr@2": 1 / 8,
        "ctr": 4 / 12,
        "ctr_by_position": [1 / 4, 0.0, 3 / 4],
        "skips": 1,                        # r2e
        "skip_rate": 1 / 12,
        "request_ctr": 3 / 4,              # r1 r3 r6
        "items_shown": 6,                  # abc dae bcf efa -> a..f
        "catalogue_share": 6 / 20, "freshness@2": None,
        "position_mismatch": 1,
        "model_versions": ["2", "3"],
        "variants": ["champion"],
    }
    assert out["groups"]["challenger"] == {
        "requests": 2,                     # r4 r5
        "users": 2,                        # u2 u3
        "impressions": 6,
        "impressions@2": 4,
        "clicks": 2,                       # r4g@2, r5c@1
        "clicks@2": 2,
        "ctr@2": 2 / 4,
        "ctr": 2 / 6,
        "ctr_by_position": [1 / 2, 1 / 2, 0.0],
        "skips": 1,                        # r5d
        "skip_rate": 1 / 6,
        "request_ctr": 2 / 2,
        "items_shown": 5,                  # agh cdg -> a c d g h
        "catalogue_share": 5 / 20, "freshness@2": None,
        "position_mismatch": 0,
        "model_versions": ["4"],
        "variants": ["challenger"],
    }


def test_by_position_is_the_hand_count() -> None:
    out = online_metrics(*session(), POLICY, by="position", k=2)
    assert out["groups"] == {
        "1": {"impressions": 6, "clicks": 2, "ctr": 2 / 6, "skips": 0, "skip_rate": 0.0},    # r1a r5c
        "2": {"impressions": 6, "clicks": 1, "ctr": 1 / 6, "skips": 1, "skip_rate": 1 / 6},  # r4g; r5d
        "3": {"impressions": 6, "clicks": 3, "ctr": 3 / 6, "skips": 1, "skip_rate": 1 / 6},  # r1c r3f r6a; r2e
    }
    assert out["overall"]["catalogue_share"] is None  # no n_catalogue


def test_freshness_is_the_hand_count() -> None:
    # fresh a and g among the slots at positions <= 2: r1 a b | r2 d a | r3 b c | r4 a g | r5 c d | r6 e f
    out = online_metrics(*session(), POLICY, by="variant", k=2, n_catalogue=N_CATALOGUE, fresh_items={"a", "g"})
    assert out["overall"]["freshness@2"] == 4 / 12                     # r1a r2a r4a r4g
    assert out["groups"]["champion"]["freshness@2"] == 2 / 8           # r1a r2a
    assert out["groups"]["challenger"]["freshness@2"] == 2 / 4         # r4a r4g
    assert out["protocol"]["n_fresh_items"] == 2
    assert online_metrics(*session(), POLICY, k=3, fresh_items=set())["overall"]["freshness@3"] == 0.0
    empty = online_metrics(None, None, None, POLICY, k=2, fresh_items={"a"})
    assert empty["overall"]["freshness@2"] is None                      # no impressions: None, not 0


def test_by_version_is_the_hand_count() -> None:
    out = online_metrics(*session(), POLICY, by="version", k=2, n_catalogue=N_CATALOGUE)
    groups = out["groups"]
    assert list(groups) == ["2", "3", "4"]
    assert groups["2"] == {
        "requests": 1, "users": 1, "impressions": 3, "impressions@2": 2,      # r6 of u3
        "clicks": 1, "clicks@2": 0, "ctr@2": 0.0, "ctr": 1 / 3,               # r6a@3
        "ctr_by_position": [0.0, 0.0, 1.0], "skips": 0, "skip_rate": 0.0, "request_ctr": 1.0,
        "items_shown": 3, "catalogue_share": 3 / 20, "freshness@2": None, "position_mismatch": 0,
        "model_versions": ["2"], "variants": ["champion"],
    }
    assert groups["3"] == {
        "requests": 3, "users": 2, "impressions": 9, "impressions@2": 6,      # r1 r2 r3 of u1 u2
        "clicks": 3, "clicks@2": 1, "ctr@2": 1 / 6, "ctr": 3 / 9,             # r1a@1, r1c@3, r3f@3
        "ctr_by_position": [1 / 3, 0.0, 2 / 3], "skips": 1, "skip_rate": 1 / 9,  # r2e
        "request_ctr": 2 / 3,                                                 # r1 r3
        "items_shown": 6, "catalogue_share": 6 / 20, "freshness@2": None, "position_mismatch": 1,  # a..f; r3f
        "model_versions": ["3"], "variants": ["champion"],
    }
    by_variant = online_metrics(*session(), POLICY, by="variant", k=2, n_catalogue=N_CATALOGUE)
    assert groups["4"] == by_variant["groups"]["challenger"]  # version 4 is exactly the challenger's requests


def test_order_extra_columns_and_k_do_not_change_the_counts() -> None:
    exposures, items, events = session()
    base = online_metrics(exposures, items, events, POLICY, k=2, n_catalogue=N_CATALOGUE)
    rng = np.random.default_rng(0)
    shuffled = [f.sample(frac=1.0, random_state=rng.integers(1 << 31)).assign(extra=1).reset_index(drop=True)
                for f in (exposures, items, events)]
    assert online_metrics(*shuffled, POLICY, k=2, n_catalogue=N_CATALOGUE) == base
    # EventLog.linked gives positions as Int64 with <NA> when unknown
    nullable = events.assign(position=events["position"].astype("Int64"))
    assert online_metrics(exposures, items, nullable, POLICY, k=2, n_catalogue=N_CATALOGUE) == base
    k3 = online_metrics(exposures, items, events, POLICY, k=3)["overall"]
    assert k3["ctr@3"] == k3["ctr"] == 6 / 18 and k3["impressions@3"] == 18
    # The event's position column is optional: without it nothing can disagree.
    no_position = online_metrics(exposures, items, events.drop(columns="position"), POLICY)
    assert no_position["overall"]["position_mismatch"] == 0


def test_the_policy_decides_what_a_click_is() -> None:
    # Under the default policy every rating and view is positive: r5d (rating 2) and r6e (view) become clicks.
    out = online_metrics(*session(), DEFAULT_POLICY, k=2)["overall"]
    assert (out["clicks"], out["skips"]) == (6 + 2, 2 - 1)  # + r5d + r6e; - r5d


@pytest.mark.parametrize("frames", [
    (None, None, None),
    (pd.DataFrame(), pd.DataFrame(), pd.DataFrame()),
    tuple(f.iloc[0:0] for f in session()),
])
def test_empty_input_gives_zeros_and_none_rates(frames: tuple) -> None:
    for by in ("variant", "version", "position"):
        out = online_metrics(*frames, POLICY, by=by, k=10, n_catalogue=5)
        assert out["groups"] == {}
        overall = out["overall"]
        assert overall["requests"] == overall["impressions"] == overall["clicks"] == overall["skips"] == 0
        assert overall["impressions@10"] == overall["clicks@10"] == overall["unattributed"] == 0
        assert overall["ctr@10"] is overall["ctr"] is overall["skip_rate"] is overall["request_ctr"] is None
        assert overall["ctr_by_position"] == [] and overall["catalogue_share"] == 0.0


def test_clicks_without_exposures_are_all_unattributed() -> None:
    _, _, events = session()
    out = online_metrics(None, None, events, POLICY)
    # 12 positive/negative rows (13 minus the view); the one without request_id is no_request_id
    assert out["overall"]["unattributed_by_reason"] == {"no_request_id": 1, "unknown_request": 11,
                                                        "item_not_shown": 0}
    assert out["overall"]["clicks"] == 0 and out["overall"]["ctr@10"] is None


def test_bad_arguments_are_refused() -> None:
    exposures, items, events = session()
    with pytest.raises(ValueError, match="by="):
        online_metrics(exposures, items, events, POLICY, by="user")
    with pytest.raises(ValueError, match="k="):
        online_metrics(exposures, items, events, POLICY, k=0)
    with pytest.raises(ValueError, match="n_catalogue"):
        online_metrics(exposures, items, events, POLICY, n_catalogue=0)
    with pytest.raises(ValueError, match="lacks columns"):
        online_metrics(exposures, items.drop(columns="position"), events, POLICY)
    with pytest.raises(ValueError, match="1-based"):
        online_metrics(exposures, items.assign(position=items["position"] - 1), events, POLICY)
