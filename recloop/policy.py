"""The event policy: what each event means for a user's history (part of the data contract).

Every event has one **role**:

- ``positive`` — consumption: it enters the user's history (the model's input), is a next-item
  training target, counts as a click in online metrics and as "seen" for ``exclude_seen``;
- ``negative`` — "not interested": never in the history, never a training target; it suppresses the
  item for that user for ``suppress_s`` seconds (serving masks it) and counts as a skip online;
- ``context`` — stored and exported, but neither of the above.

Defaults: ``click``, ``like``, ``purchase``, ``view`` and ``rating`` are positive, ``skip`` is
negative. A client that reports an item as merely *shown* must not send ``view`` (a positive): the
exposure log records what was shown. Every rating counts as consumption by default (the academic
leave-one-out protocol, so published comparisons on MovieLens stay valid); with
``rating_negative_below`` set, a rating below it is a negative instead.

``event_role`` is the one definition; every place that builds a history calls it (directly, through
``EventPolicy.roles`` on frames, or through ``EventLog``'s SQL form of it, which
``tests/unit/test_event_policy.py`` checks against it): training sequences (``flows/train.py``,
``flows/evaluate.py``, the benchmarks), the event log's recent-items read, the online push (it pushes
that read), the materialised ``user_recent_items`` view, and the serving mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from recloop.contract import EVENT_TYPES, normalise_event_type

Role = Literal["positive", "negative", "context"]
ROLES: tuple[Role, ...] = ("positive", "negative", "context")

DEFAULT_POSITIVE: frozenset[str] = frozenset({"view", "click", "like", "purchase", "rating"})
DEFAULT_NEGATIVE: frozenset[str] = frozenset({"skip"})
DEFAULT_SUPPRESS_S = 30 * 86_400.0  # a "not interested" hides the item for 30 days


@dataclass(frozen=True)
class EventPolicy:
    """Which event types are positive, negative or context only (the rest of ``EVENT_TYPES``).

    Attributes:
        positive: event types that are consumption (history, training target, click).
        negative: event types that are "not interested" (suppressed, skip).
        rating_negative_below: when set, a ``rating`` whose value is below it is negative (a rating
            at or above it keeps the role ``rating`` has in ``positive``/``negative``).
        suppress_s: seconds a negative hides its item from that user (server receive time).
    Raises:
        ValueError: a type is unknown, or listed as both positive and negative.
    """

    positive: frozenset[str] = DEFAULT_POSITIVE
    negative: frozenset[str] = DEFAULT_NEGATIVE
    rating_negative_below: float | None = None
    suppress_s: float = DEFAULT_SUPPRESS_S
    context: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        pos = frozenset(normalise_event_type(t) for t in self.positive)
        neg = frozenset(normalise_event_type(t) for t in self.negative)
        unknown = sorted((pos | neg) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"event policy names unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        both = sorted(pos & neg)
        if both:
            raise ValueError(f"event types {both} are both positive and negative")
        if self.rating_negative_below is not None and not math.isfinite(self.rating_negative_below):
            raise ValueError(f"rating_negative_below={self.rating_negative_below} must be finite or None")
        if not self.suppress_s >= 0:
            raise ValueError(f"suppress_s={self.suppress_s} must be >= 0")
        object.__setattr__(self, "positive", pos)
        object.__setattr__(self, "negative", neg)
        object.__setattr__(self, "context", frozenset(EVENT_TYPES) - pos - neg)

    @classmethod
    def from_settings(cls, settings: Any) -> EventPolicy:
        """The policy of ``recloop.settings.Settings`` (``event_positive``, ``event_negative``,
        ``rating_negative_below``, ``negative_suppress_s``)."""
        return cls(
            positive=frozenset(_split(settings.event_positive)),
            negative=frozenset(_split(settings.event_negative)),
            rating_negative_below=settings.rating_negative_below,
            suppress_s=float(settings.negative_suppress_s),
        )

    def role(self, event_type: object, value: object = None) -> Role:
        """``event_role(event_type, value, self)``."""
        return event_role(event_type, value, self)

    def roles(self, event_types: Iterable[object], values: Iterable[object] | None = None) -> np.ndarray:
        """Vectorised ``event_role``: (n,) object array of roles (same result row by row)."""
        types = pd.Series(list(event_types), dtype=object).map(
            lambda t: normalise_event_type(t) if isinstance(t, str) else ""
        )
        vals = (
            pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce")
            if values is not None
            else pd.Series(np.nan, index=types.index)
        )
        out = np.full(len(types), "context", dtype=object)
        out[types.isin(self.positive).to_numpy()] = "positive"
        out[types.isin(self.negative).to_numpy()] = "negative"
        if self.rating_negative_below is not None:
            low = (types == "rating") & (vals < self.rating_negative_below)
            out[low.to_numpy()] = "negative"
        return out

    def positive_mask(self, events: pd.DataFrame) -> np.ndarray:
        """(n,) bool: the rows of a contract events frame that are positive."""
        return self.roles(events["event_type"], events["value"] if "value" in events else None) == "positive"

    def positives(self, events: pd.DataFrame) -> pd.DataFrame:
        """The positive rows of a contract events frame (order and index kept): what histories and
        training sequences are built from."""
        return events[self.positive_mask(events)]

    def describe(self) -> dict[str, Any]:
        """The policy as a protocol entry (every benchmark and evaluation report states it)."""
        return {
            "positive": sorted(self.positive),
            "negative": sorted(self.negative),
            "context": sorted(self.context),
            "rating_negative_below": self.rating_negative_below,
            "suppress_s": self.suppress_s,
        }


DEFAULT_POLICY = EventPolicy()


def event_role(event_type: object, value: object = None, policy: EventPolicy = DEFAULT_POLICY) -> Role:
    """The role of one event under ``policy``. Pure.

    Args:
        event_type: the contract's event type (case and surrounding spaces ignored).
        value: the event's value (a rating's score); None/NaN when absent.
        policy: the event policy.
    Returns:
        "positive", "negative" or "context" ("context" for a type the contract does not know).
    """
    t = normalise_event_type(event_type) if isinstance(event_type, str) else ""
    if t == "rating" and policy.rating_negative_below is not None and _number(value) < policy.rating_negative_below:
        return "negative"
    if t in policy.positive:
        return "positive"
    if t in policy.negative:
        return "negative"
    return "context"


def _number(value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out


def _split(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]
