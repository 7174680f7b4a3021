"""The ``users`` suite: the user dimension table (validated before it is coerced to the contract).

Runs on the raw table with ``user_id`` normalised to strings (nulls kept). Every failure stops the batch.
"""

from __future__ import annotations

import great_expectations as gx

NAME = "users"
PARAMETERS: dict[str, str] = {}


def build_suite() -> gx.ExpectationSuite:
    """Build the ``users`` expectation suite (GX 1.x API).

    Returns:
        An unsaved ``ExpectationSuite`` named ``users`` (no suite parameters).
    """
    E, exps = gx.expectations, []
    stop = {"on_fail": "stop"}
    # Schema drift: the join key renamed upstream (e.g. userId).
    exps.append(E.ExpectColumnToExist(column="user_id", meta=stop))
    # Null keys cannot be joined to events or to the Feast user entity.
    exps.append(E.ExpectColumnValuesToNotBeNull(column="user_id", meta=stop))
    # Duplicated keys: one user with two attribute rows makes features ambiguous.
    exps.append(E.ExpectColumnValuesToBeUnique(column="user_id", meta=stop))
    return gx.ExpectationSuite(name=NAME, expectations=exps)
