"""Pseudonymous user ids: a keyed hash replaces every user id where it enters the platform.

With ``settings.pseudonymize_user_ids`` (``RECLOOP_PSEUDONYMIZE_USER_IDS=true``) and a secret
``settings.pseudonym_key`` (``RECLOOP_PSEUDONYM_KEY``, the same on every replica and flow run), a user id is
replaced by ``"p" + HMAC-SHA256(key, normalised id)[:32 hex]`` (RFC 2104; 128 bits, so collisions are
negligible) at the two doors data comes in by:

- **ingestion**: ``recloop.sources.read_source`` rewrites the ``user_id`` column of the events and users frames
  before anything else sees them (validation, quarantine, lake, feature tables, training), and event ids a
  source lacks are then derived from the pseudonym;
- **the API**: ``serving/service.py`` maps the ``user_id`` of ``recommend``, ``feedback`` and ``forget`` before
  the serving core, the event log, the exposure log or the online store see it; ``recloop forget USER_ID`` does
  the same.

So no store holds a raw id, and everything downstream (forgetting, whose tombstone is the keyed hash of the
stored id; online-experiment assignment, which hashes the stored id with the experiment's salt; the simulator
over HTTP) works on the stored id unchanged. A raw id that breaks the contract's id rule is left as it is, so
the row is refused or quarantined for its real reason. Rows already stored (the event log's, the loop's
batches) are never mapped twice: the mapping applies at the doors only. The key cannot be changed without
re-ingesting: stored pseudonyms would no longer match the API's.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from recloop.contract import id_violation, normalise_id

#: Hex characters of the HMAC kept in a pseudonym (128 bits).
PSEUDONYM_HEX = 32
#: Every pseudonym starts with this letter (ids stay strings that no parser reads as a number).
PREFIX = "p"


@dataclass(frozen=True)
class Pseudonymizer:
    """``user_id -> "p" + HMAC-SHA256(key, normalise_id(user_id))[:32]``; invalid ids unchanged.

    Attributes:
        key: the secret (bytes, never printed).
    """

    key: bytes = field(repr=False)

    def __call__(self, user_id: Any) -> Any:
        if id_violation(user_id):
            return user_id  # refused or quarantined later for its own reason
        digest = hmac.new(self.key, normalise_id(user_id).encode(), hashlib.sha256).hexdigest()
        return PREFIX + digest[:PSEUDONYM_HEX]

    def frame(self, df: pd.DataFrame | None, column: str = "user_id") -> pd.DataFrame | None:
        """A copy of ``df`` with ``column`` mapped (None, an empty frame or one without the column: unchanged).

        Distinct ids are hashed once each (a 100,000-event file has ~1,000 users).
        """
        if df is None or column not in df.columns or not len(df):
            return df
        out = df.copy()
        uniques = pd.unique(out[column])
        mapping = {u: self(u) for u in uniques}
        out[column] = out[column].map(mapping).astype(object)
        return out


def from_settings(settings: Any) -> Pseudonymizer | None:
    """The pseudonymizer ``settings`` ask for, or None when ``pseudonymize_user_ids`` is off.

    Raises:
        ValueError: pseudonyms are on but ``pseudonym_key`` is unset or shorter than 16 characters (a
            generated per-host key would give every replica other pseudonyms).
    """
    if not getattr(settings, "pseudonymize_user_ids", False):
        return None
    secret = getattr(settings, "pseudonym_key", None)
    key = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    if not key or len(key) < 16:
        raise ValueError("RECLOOP_PSEUDONYMIZE_USER_IDS is on: set RECLOOP_PSEUDONYM_KEY to a secret of at least 16 "
                         "characters, the same on every replica and flow run")
    return Pseudonymizer(str(key).encode())


def identity_or(settings: Any) -> Callable[[Any], Any]:
    """``from_settings(settings)``, or the identity when pseudonyms are off."""
    p = from_settings(settings)
    return p if p is not None else (lambda user_id: user_id)
