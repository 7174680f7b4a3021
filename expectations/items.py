"""The ``items`` suite: the catalogue dimension table (validated before it is coerced to the contract).

The suite runs on the raw catalogue with ``item_id`` normalised to strings (nulls kept), so that a
duplicated or missing key is reported by GX rather than by the coercion. Every failure stops the batch:
a broken catalogue breaks the item vocabulary, the content encoder and the known-item check.
"""

from __future__ import annotations

import great_expectations as gx

NAME = "items"
PARAMETERS: dict[str, str] = {}


def build_suite() -> gx.ExpectationSuite:
    """Build the ``items`` expectation suite (GX 1.x API).

    Returns:
        An unsaved ``ExpectationSuite`` named ``items`` (no suite parameters).
    """
    E, exps = gx.expectations, []
    stop = {"on_fail": "stop"}
    # Schema drift: the key or the title (input of the content encoder) renamed upstream.
    exps.append(E.ExpectColumnToExist(column="item_id", meta=stop))
    exps.append(E.ExpectColumnToExist(column="title", meta=stop))
    # An empty catalogue: every event would look like an unknown item.
    exps.append(E.ExpectTableRowCountToBeBetween(min_value=1, meta=stop))
    # Null keys cannot be joined or indexed in the item vocabulary.
    exps.append(E.ExpectColumnValuesToNotBeNull(column="item_id", meta=stop))
    # Duplicated keys: two rows for one item make the vocabulary and the item features ambiguous.
    exps.append(E.ExpectColumnValuesToBeUnique(column="item_id", meta=stop))
    return gx.ExpectationSuite(name=NAME, expectations=exps)
