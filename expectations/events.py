"""The ``events`` suite: what a batch of interaction events must satisfy before it reaches features.

The suite runs on the *coerced* events (``recloop.contract.EVENT_COLUMNS``) plus one derived column,
``user_share`` (the share of the batch's events made by that row's user), which carries the bot guard.
Run-time values (the source's rating range, the clock, the catalogue, thresholds) are GX suite
parameters (``{"$PARAMETER": name}``), so the stored JSON is the suite that actually runs.

Each expectation's ``meta["on_fail"]`` is the gate policy: ``stop`` (the batch is rejected: a
structural fault) or ``quarantine`` (the unexpected rows go to quarantine, the rest continue while
the bad share stays under ``max_bad_row_share``).
"""

from __future__ import annotations

import great_expectations as gx

from recloop.contract import EVENT_COLUMNS, EVENT_TYPES

NAME = "events"
DERIVED_COLUMNS: tuple[str, ...] = ("user_share",)
VIEW_COLUMNS: tuple[str, ...] = EVENT_COLUMNS + DERIVED_COLUMNS
# Suite parameters the runner must supply (name -> meaning).
PARAMETERS: dict[str, str] = {
    "rating_min": "lowest valid rating of the source (e.g. 0.5)",
    "rating_max": "highest valid rating of the source (e.g. 5)",
    "ts_min": "timestamp floor (tz-aware UTC)",
    "ts_max": "run time plus the allowed clock skew (tz-aware UTC)",
    "known_item_ids": "item ids of the catalogue",
    "known_item_mostly": "1 - tolerated share of events naming items not in the catalogue",
    "bot_max_user_share": "largest share of a batch one user may produce",
}
_RATING = 'event_type=="rating"'


def _p(name: str) -> dict[str, str]:
    return {"$PARAMETER": name}


def build_suite() -> gx.ExpectationSuite:
    """Build the ``events`` expectation suite (GX 1.x API).

    Returns:
        An unsaved ``ExpectationSuite`` named ``events`` whose run-time values are the suite
        parameters listed in ``PARAMETERS``.
    """
    E, exps = gx.expectations, []
    stop, quarantine = {"on_fail": "stop"}, {"on_fail": "quarantine"}

    # Schema drift: a renamed/added/dropped column upstream.
    exps.append(E.ExpectTableColumnsToMatchSet(column_set=list(VIEW_COLUMNS), exact_match=True, meta=stop))
    # An empty batch: a broken export or a stalled event log must not look like "no new data is fine".
    exps.append(E.ExpectTableRowCountToBeBetween(min_value=1, meta=stop))
    # Type drift: ids stored as numbers (join keys would stop matching), values as strings, naive times.
    for column in ("event_id", "user_id", "item_id", "event_type", "source"):
        exps.append(E.ExpectColumnValuesToBeOfType(column=column, type_="object", meta=stop))
    exps.append(E.ExpectColumnValuesToBeOfType(column="value", type_="float64", meta=stop))
    exps.append(E.ExpectColumnValuesToBeOfType(column="timestamp", type_="Timestamp", meta=stop))
    # Null ids: user_id/item_id are Feast join keys and the model vocabulary; event_id the idempotency key.
    for column in ("event_id", "user_id", "item_id"):
        exps.append(E.ExpectColumnValuesToNotBeNull(column=column, meta=quarantine))
    # Unknown event types: a client emitting e.g. "hover" would silently change the training signal.
    exps.append(
        E.ExpectColumnValuesToBeInSet(column="event_type", value_set=list(EVENT_TYPES), meta=quarantine)
    )
    # Out-of-range ratings: a scale change (1-10) or a sentinel (-1, 99) poisons explicit-feedback targets.
    exps.append(
        E.ExpectColumnValuesToBeBetween(
            column="value",
            min_value=_p("rating_min"),
            max_value=_p("rating_max"),
            row_condition=_RATING,
            condition_parser="pandas",
            meta=quarantine,
        )
    )
    # A rating without a value: a dropped field in the client payload.
    exps.append(
        E.ExpectColumnValuesToNotBeNull(
            column="value", row_condition=_RATING, condition_parser="pandas", meta=quarantine
        )
    )
    # Future timestamps (client clocks, ms read as s) would leak the future into temporal splits;
    # timestamps before the floor are epoch-zero defaults or a unit error.
    exps.append(
        E.ExpectColumnValuesToBeBetween(
            column="timestamp", min_value=_p("ts_min"), max_value=_p("ts_max"), meta=quarantine
        )
    )
    # Duplicated idempotency keys: a replayed batch would double-count events. (Exact duplicates are
    # deduplicated and conflicting ones quarantined before the suite runs, so this must hold.)
    exps.append(E.ExpectColumnValuesToBeUnique(column="event_id", meta=stop))
    # Events naming items outside the catalogue: a few are legitimate (feedback on new items, used after
    # the next retrain); many mean the catalogue and the events come from different systems.
    exps.append(
        E.ExpectColumnValuesToBeInSet(
            column="item_id", value_set=_p("known_item_ids"), mostly=_p("known_item_mostly"), meta=stop
        )
    )
    # Bot guard: one user producing a large share of a batch (crawler, load test, replay loop).
    exps.append(
        E.ExpectColumnMaxToBeBetween(column="user_share", max_value=_p("bot_max_user_share"), meta=stop)
    )
    return gx.ExpectationSuite(name=NAME, expectations=exps)
